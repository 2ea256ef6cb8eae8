"""The Triton stage against a real tritonserver (the nvidia-pytriton wheel's Triton 2.51, CPU).

One server per session serves the tiny export twice: as a Python model (``model.py`` in the version
folder, 2 instances so concurrent requests really run side by side) and through the ``tgate``
Python-based backend. Every image is compared, exactly, with ``TGatePipeline`` run here.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (triton extra) not installed")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (triton extra) not installed")

from google.protobuf import text_format  # noqa: E402  (tritonclient[grpc] brings protobuf)
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tgate_trt.runtime.pipeline import TGatePipeline  # noqa: E402
from tgate_trt.triton import cli  # noqa: E402
from tgate_trt.triton.server import TritonServer, TritonUnavailable, find_tritonserver  # noqa: E402

try:
    find_tritonserver()
except TritonUnavailable as _exc:
    pytest.skip(str(_exc), allow_module_level=True)

MODEL = "tgate_py"  # model.py form, 2 instances, artifacts linked
BACKEND_MODEL = "tgate_be"  # backend "tgate" form, artifacts copied
FAMILY_MODELS = {"tiny-sdxl": "tgate_sdxl", "tiny-lcm": "tgate_lcm"}  # other model families, 1 instance each
OV_MODEL = "tgate_ov"  # --backend openvino: artifacts copied with their OpenVINO build
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
MAX_STEPS = 8
STEPS, GATE = 4, 2  # the models' default steps and gate
THREADS = 1  # ORT threads, the same here and in the server so the float results are bit-identical
REQUEST = {
    "negative_prompt": "blurry",
    "seed": 7,
    "steps": 5,
    "gate_step": 3,
    "guidance_scale": 6.0,
    "height": 32,
    "width": 32,
}

_spec = importlib.util.spec_from_file_location(
    "triton_client", Path(__file__).resolve().parents[1] / "scripts" / "triton_client.py"
)
assert _spec is not None and _spec.loader is not None
client_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client_script)


def _generate_repo(export: Path, repo: Path, name: str, *extra: str) -> None:
    argv = [str(export), "--repo", str(repo), "--name", name, "--threads", str(THREADS)]
    argv += ["--max-steps", str(MAX_STEPS), "--steps", str(STEPS), "--gate", str(GATE), *extra]
    assert cli.main(argv) == 0


@pytest.fixture(scope="module")
def ov_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A copy of the tiny export with an OpenVINO build at the default precision (None without openvino)."""
    if not HAS_OPENVINO:
        return None
    from tgate_trt.engines import cli as build_cli

    export = tmp_path_factory.mktemp("triton-ov") / "tiny"
    shutil.copytree(tiny_export, export)
    assert build_cli.main([str(export), "--target", "openvino"]) == 0
    return export


@pytest.fixture(scope="module")
def server(
    tiny_export: Path,
    model_export: Callable[[str], Path],
    ov_export: Path | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    _generate_repo(tiny_export, repo, MODEL, "--instances", "2", "--link")
    _generate_repo(tiny_export, repo, BACKEND_MODEL, "--form", "backend")
    for variant, name in FAMILY_MODELS.items():
        _generate_repo(model_export(variant), repo, name, "--link")
    # Explicit model control: these models load at start; others (a tampered copy) load on demand.
    args = ["--model-control-mode=explicit", f"--load-model={MODEL}", f"--load-model={BACKEND_MODEL}"]
    args += [f"--load-model={name}" for name in FAMILY_MODELS.values()]
    if ov_export is not None:
        _generate_repo(ov_export, repo, OV_MODEL, "--backend", "openvino")
        args.append(f"--load-model={OV_MODEL}")
    srv = TritonServer(repo, root / "work", extra_args=args)
    srv.start()
    try:
        seconds = srv.wait_ready(timeout=600)
        print(f"tritonserver ready in {seconds:.1f}s")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def local(tiny_export: Path) -> TGatePipeline:
    return TGatePipeline.from_export(tiny_export, threads=THREADS)


def _expected(pipe: TGatePipeline, prompt: str, **params: Any) -> np.ndarray:
    """What the served model must return: the pipeline run here, with the models' defaults."""
    p = {"seed": 0, "steps": STEPS, "gate_step": GATE, "guidance_scale": 7.5, **params}
    result = pipe(
        prompt,
        negative_prompt=p.get("negative_prompt"),
        num_inference_steps=p["steps"],
        gate_step=p["gate_step"],
        guidance_scale=p["guidance_scale"],
        height=p.get("height"),
        width=p.get("width"),
        seed=p["seed"],
    )
    return np.asarray(result.images[0].convert("RGB"), dtype=np.uint8)


def _client(server: TritonServer, protocol: str, **kwargs: Any) -> tuple[Any, Any]:
    module = client_script.client_module(protocol)
    url = server.http_url if protocol == "http" else server.grpc_url
    return module.InferenceServerClient(url, **kwargs), module


@pytest.mark.slow
@pytest.mark.parametrize("model", [MODEL, BACKEND_MODEL])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_equals_local_pipeline(server: TritonServer, local: TGatePipeline, protocol: str, model: str) -> None:
    client, module = _client(server, protocol)
    image = client_script.generate(client, module, model, "a red circle on the left", **REQUEST)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, _expected(local, "a red circle on the left", **REQUEST))


@pytest.mark.slow
def test_defaults_come_from_config_parameters(server: TritonServer, local: TGatePipeline) -> None:
    client, module = _client(server, "http")
    image = client_script.generate(client, module, MODEL, "a blue square")
    defaults = local.manifest.defaults
    assert image.shape == (defaults["height"], defaults["width"], 3)
    np.testing.assert_array_equal(image, _expected(local, "a blue square"))


@pytest.mark.slow
def test_concurrent_requests_equal_sequential(server: TritonServer, local: TGatePipeline) -> None:
    requests = [
        (f"shape number {i}, {'red' if i % 2 else 'blue'}", {"seed": 100 + i, "height": 32, "width": 32})
        for i in range(16)
    ]
    client, module = _client(server, "http")
    sequential = [client_script.generate(client, module, MODEL, p, **kw) for p, kw in requests]

    def one(request: tuple[str, dict[str, Any]]) -> np.ndarray:
        own, mod = _client(server, "http")  # one connection per thread
        return client_script.generate(own, mod, MODEL, request[0], **request[1])

    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(one, requests))
    for seq, con in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(con, seq)
    assert len({im.tobytes() for im in sequential}) == 16  # different prompts and seeds: different images
    for index in (0, 15):  # and they are the pipeline's images, not merely self-consistent
        np.testing.assert_array_equal(sequential[index], _expected(local, requests[index][0], **requests[index][1]))


def _raw_inputs(module: Any, spec: dict[str, tuple[str, Any]]) -> list[Any]:
    """Inputs with chosen wire types, to send what a well-behaved client would not."""
    inputs = []
    for name, (wire, array) in spec.items():
        tensor = module.InferInput(name, list(array.shape), wire)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


PROMPT = ("BYTES", np.array([b"a red circle"], dtype=np.object_))
BAD_REQUESTS = {
    "missing prompt": ({"seed": ("INT64", np.array([1], np.int64))}, "prompt"),
    "seed as FP32": ({"prompt": PROMPT, "seed": ("FP32", np.array([1.0], np.float32))}, "seed"),
    "prompt as INT32": ({"prompt": ("INT32", np.array([1], np.int32))}, "prompt"),
    "gate_step 0": ({"prompt": PROMPT, "gate_step": ("INT32", np.array([0], np.int32))}, "gate_step must be >= 1"),
    "gate_step -3": ({"prompt": PROMPT, "gate_step": ("INT32", np.array([-3], np.int32))}, "gate_step must be >= 1"),
    "steps above max": ({"prompt": PROMPT, "steps": ("INT32", np.array([9], np.int32))}, "max_steps"),
    "height 40": ({"prompt": PROMPT, "height": ("INT32", np.array([40], np.int32))}, "multiples of 16"),
    "empty prompt": ({"prompt": ("BYTES", np.array([b"  "], dtype=np.object_))}, "prompt is empty"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize(("protocol", "model"), [("http", MODEL), ("grpc", BACKEND_MODEL)])
def test_bad_request_errors_then_model_keeps_serving(
    server: TritonServer, local: TGatePipeline, protocol: str, model: str, case: str
) -> None:
    spec, message = BAD_REQUESTS[case]
    client, module = _client(server, protocol)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _raw_inputs(module, spec))
    assert message in str(err.value), str(err.value)
    image = client_script.generate(client, module, model, "a green triangle", seed=5, height=32, width=32)
    np.testing.assert_array_equal(image, _expected(local, "a green triangle", seed=5, height=32, width=32))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(FAMILY_MODELS))
def test_other_model_families_are_served(
    server: TritonServer, model_export: Callable[[str], Path], variant: str
) -> None:
    """SDXL (two text encoders, added conditioning) and a guidance-free LCM model serve through the same
    model code and equal their local pipeline; the LCM model refuses a negative prompt, then still serves."""
    local = TGatePipeline.from_export(model_export(variant), threads=THREADS)
    client, module = _client(server, "http")
    params = {"seed": 3, "steps": 4, "gate_step": 2, "guidance_scale": 2.0, "height": 32, "width": 32}
    image = client_script.generate(client, module, FAMILY_MODELS[variant], "a blue square", **params)
    np.testing.assert_array_equal(image, _expected(local, "a blue square", **params))
    if not local.manifest.model.cfg:
        with pytest.raises(InferenceServerException, match="negative"):
            client_script.generate(client, module, FAMILY_MODELS[variant], "a blue square", negative_prompt="red")
        again = client_script.generate(client, module, FAMILY_MODELS[variant], "a blue square", **params)
        np.testing.assert_array_equal(again, image)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino (the openvino extra) is not installed")
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_openvino_form_equals_local_pipeline(server: TritonServer, ov_export: Path | None, protocol: str) -> None:
    """--backend openvino: the served image is the local OpenVINO pipeline's, to the bit."""
    assert ov_export is not None
    local = TGatePipeline.from_export(ov_export, backend="openvino", threads=THREADS)
    client, module = _client(server, protocol)
    image = client_script.generate(client, module, OV_MODEL, "a red circle on the left", **REQUEST)
    np.testing.assert_array_equal(image, _expected(local, "a red circle on the left", **REQUEST))
    # ... and differs from the ORT model's by the bf16 rounding (on CPUs with bf16), so the backend is real
    ort = client_script.generate(client, module, MODEL, "a red circle on the left", **REQUEST)
    section = local.manifest.extra["engines"]["openvino"]
    assert (section["precision"] == "f32") or not np.array_equal(image, ort)


@pytest.mark.slow
def test_tampered_artifacts_are_refused_at_load(server: TritonServer, tiny_export: Path) -> None:
    name = "tgate_tampered"
    _generate_repo(tiny_export, server.repo, name, "--form", "backend")
    onnx = server.repo / name / "1" / "artifacts" / "vae_decoder" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    client, _ = _client(server, "http")
    with pytest.raises(InferenceServerException) as err:
        client.load_model(name)
    assert "sha256" in str(err.value) and "vae_decoder" in str(err.value), str(err.value)
    assert client.is_model_ready(MODEL) and client.is_model_ready(BACKEND_MODEL)
    assert not client.is_model_ready(name)


def _parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_gpu_trt_config(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    argv = [str(tiny_export), "--repo", str(repo), "--name", "sd15_gpu", "--kind", "gpu", "--backend", "trt"]
    assert cli.main([*argv, "--instances", "2", "--link", "--max-steps", "40"]) == 0
    assert "no TensorRT engines" in capsys.readouterr().err  # tiny has none; the config is still written
    config = _parse_config(repo / "sd15_gpu" / "config.pbtxt")
    assert config.name == "sd15_gpu" and config.backend == "python" and config.max_batch_size == 0
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    defaults = TGatePipeline.from_export(tiny_export).manifest.defaults
    assert params["backend"] == "trt" and params["artifacts"] == str(tiny_export.resolve())
    assert params["max_steps"] == "40" and params["default_steps"] == str(defaults["steps"])
    assert params["default_gate_step"] == str(defaults["gate_step"])
    assert float(params["default_guidance_scale"]) == defaults["guidance_scale"]
    assert (params["default_height"], params["default_width"]) == (str(defaults["height"]), str(defaults["width"]))
    assert Path(params["EXECUTION_ENV_PATH"], "bin", "activate").is_file()
    inputs = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert inputs == {
        "prompt": ("TYPE_STRING", [1], False),
        "negative_prompt": ("TYPE_STRING", [1], True),
        "seed": ("TYPE_INT64", [1], True),
        "steps": ("TYPE_INT32", [1], True),
        "gate_step": ("TYPE_INT32", [1], True),
        "guidance_scale": ("TYPE_FP32", [1], True),
        "height": ("TYPE_INT32", [1], True),
        "width": ("TYPE_INT32", [1], True),
    }
    [out] = config.output
    assert (out.name, model_config_pb2.DataType.Name(out.data_type), list(out.dims)) == (
        "image",
        "TYPE_UINT8",
        [-1, -1, 3],
    )
    assert (repo / "sd15_gpu" / "1" / "model.py").is_file() and not (repo / "sd15_gpu" / "1" / "artifacts").exists()


def test_generator_refuses_before_writing(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    base = [str(tiny_export), "--repo", str(repo), "--link"]
    assert cli.main([*base, "--kind", "cpu", "--backend", "trt"]) == 2
    assert "--kind gpu" in capsys.readouterr().err
    assert cli.main([*base, "--max-steps", "3"]) == 2  # below the export's default steps
    assert "max_steps" in capsys.readouterr().err
    assert cli.main([*base, "--gate", "0"]) == 2
    assert "gate_step" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing"), "--repo", str(repo)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not repo.exists() or not any(repo.iterdir())
    assert cli.main(base) == 0
    assert cli.main(base) == 2  # the model exists
    assert "--force" in capsys.readouterr().err
    assert cli.main([*base, "--force", "--instances", "3"]) == 0
    assert [p.name for p in repo.iterdir()] == ["sd15_tgate"]  # no temp folders left behind
    assert "count: 3" in (repo / "sd15_tgate" / "config.pbtxt").read_text()


def test_generator_refuses_modified_export(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    (export / "text_encoder" / "model.onnx").write_bytes(b"not a graph")
    assert cli.main([str(export), "--repo", str(tmp_path / "repo")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_as_backend_installs_model_py(tmp_path: Path) -> None:
    assert cli.main(["--as-backend", str(tmp_path / "backends")]) == 0
    installed = tmp_path / "backends" / "tgate" / "model.py"
    assert installed.read_text() == (Path(cli.__file__).with_name("model.py")).read_text()
    assert cli.main(["--as-backend", str(tmp_path / "b"), "--repo", str(tmp_path / "r")]) == 2  # one mode at a time


def test_parse_request_without_a_server() -> None:
    from tgate_trt.triton.contract import RequestError, Settings, parse_request

    settings = Settings(steps=4, gate_step=2, guidance_scale=7.5, height=64, width=64, max_steps=8)
    inputs: dict[str, np.ndarray] = {"prompt": np.array([b"a cat"], dtype=np.object_)}
    req = parse_request(inputs.get, settings)
    assert (req.prompt, req.negative_prompt, req.seed, req.steps, req.gate_step) == ("a cat", None, 0, 4, 2)
    assert (req.guidance_scale, req.height, req.width) == (7.5, 64, 64)
    bad = {
        "prompt": (np.array([b"\xff\xfe"], dtype=np.object_), "UTF-8"),
        "seed": (np.array([-1], np.int64), "seed"),
        "guidance_scale": (np.array([np.nan], np.float32), "finite"),
        "width": (np.array([0], np.int32), "positive"),
        "steps": (np.array([1, 2], np.int32), "exactly one value"),
    }
    for name, (array, message) in bad.items():
        with pytest.raises(RequestError, match=message):
            parse_request({**inputs, name: array}.get, settings)
    with pytest.raises(ValueError, match="max_steps"):
        Settings(steps=9, gate_step=2, guidance_scale=7.5, height=64, width=64, max_steps=8).check()
