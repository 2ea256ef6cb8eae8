"""The Triton stage against a real tritonserver (the nvidia-pytriton wheel's Triton 2.51, CPU).

One server per module serves the tiny export twice: as a Python model (``model.py`` in the version
folder, 2 instances so concurrent requests really run side by side) and through the ``tgate``
Python-based backend. Every image is compared, exactly, with ``TGatePipeline`` run here. Bad requests
(a table, over HTTP and gRPC) must be refused with HTTP 400 / INVALID_ARGUMENT, the reason, and fast;
bad ``tgate-triton`` invocations must exit 2 with one line and leave nothing behind. Faults (a killed
stub, queued jobs, memory) are in ``test_triton_faults.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import socket
import subprocess
import sys
import time
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
V2_MODEL = "tgate_v2"  # a --schedule v2 export: requests carry sp_interval / fi_interval / warm_up
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
    v2_export: Callable[[str], Path],
    ov_export: Path | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    _generate_repo(tiny_export, repo, MODEL, "--instances", "2", "--link", "--max-pixels", "16384")
    _generate_repo(tiny_export, repo, BACKEND_MODEL, "--form", "backend", "--max-pixels", "16384")
    for variant, name in FAMILY_MODELS.items():
        _generate_repo(model_export(variant), repo, name, "--link")
    # Explicit model control: these models load at start; others (a tampered copy) load on demand.
    args = ["--model-control-mode=explicit", f"--load-model={MODEL}", f"--load-model={BACKEND_MODEL}"]
    args += [f"--load-model={name}" for name in FAMILY_MODELS.values()]
    _generate_repo(v2_export("tiny"), repo, V2_MODEL, "--link")
    args.append(f"--load-model={V2_MODEL}")
    if ov_export is not None:
        _generate_repo(ov_export, repo, OV_MODEL, "--backend", "openvino")
        args.append(f"--load-model={OV_MODEL}")
    srv = TritonServer(repo, root / "work", extra_args=args, exit_timeout=3)
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


def _bytes(*texts: bytes) -> tuple[str, np.ndarray]:
    return ("BYTES", np.array(list(texts), dtype=np.object_))


def _int32(value: int) -> tuple[str, np.ndarray]:
    return ("INT32", np.array([value], np.int32))


def _fp32(value: float) -> tuple[str, np.ndarray]:
    return ("FP32", np.array([value], np.float32))


PROMPT = _bytes(b"a red circle")
SEED_MSG = "seed must be an integer in 0..9223372036854775807"
GUIDANCE_MSG = "guidance_scale must be a finite number in 0..100"
FAST = 2.0  # seconds: a refusal does no image work (the models' queue is idle here; see test_triton_faults)
# case -> (inputs, outputs to request (None: all), a fragment of the message). The tiny export takes sizes
# in multiples of 16 up to 16,384 pixels (--max-pixels of the repository); the models cap steps at 8, batch at 4.
BAD_REQUESTS: dict[str, tuple[dict[str, tuple[str, Any]], list[str] | None, str]] = {
    "missing prompt": ({"seed": ("INT64", np.array([1], np.int64))}, None, "prompt"),
    "seed as FP32": ({"prompt": PROMPT, "seed": _fp32(1.0)}, None, "seed"),
    "prompt as INT32": ({"prompt": _int32(1)}, None, "prompt"),
    "unknown input": ({"prompt": PROMPT, "strength": _fp32(0.5)}, None, "strength"),
    "steps with two values": (
        {"prompt": PROMPT, "steps": ("INT32", np.array([4, 5], np.int32))},
        None,
        "steps",
    ),
    "empty prompt": ({"prompt": _bytes(b"")}, None, "prompt is empty"),
    "blank prompt": ({"prompt": _bytes(b"  \t ")}, None, "prompt is empty"),
    "unreadable prompt": ({"prompt": _bytes("\u200b\u200b".encode())}, None, "no tokens the model can read"),
    "prompt not UTF-8": ({"prompt": _bytes(b"\xff\xfe")}, None, "not valid UTF-8"),
    "no prompts": ({"prompt": ("BYTES", np.array([], dtype=np.object_))}, None, "must be an integer in 1..4, got 0"),
    "batch above max_batch": ({"prompt": _bytes(*[b"a cat"] * 5)}, None, "must be an integer in 1..4, got 5"),
    "negatives do not match prompts": (
        {"prompt": _bytes(b"a cat", b"a dog"), "negative_prompt": _bytes(b"x", b"y", b"z")},
        None,
        "negative_prompt has 3 entries for 2 prompts",
    ),
    "two prompts, output image": ({"prompt": _bytes(b"a cat", b"a dog")}, ["image"], "request the output 'images'"),
    "seed -1": (
        {"prompt": PROMPT, "seed": ("INT64", np.array([-1], np.int64))},
        None,
        SEED_MSG,
    ),
    "steps 0": ({"prompt": PROMPT, "steps": _int32(0)}, None, "steps must be an integer in 1..8, got 0"),
    "steps above max_steps": ({"prompt": PROMPT, "steps": _int32(9)}, None, "steps must be an integer in 1..8, got 9"),
    "gate_step 0": ({"prompt": PROMPT, "gate_step": _int32(0)}, None, "gate_step must be an integer >= 1, got 0"),
    "gate_step -3": ({"prompt": PROMPT, "gate_step": _int32(-3)}, None, "gate_step must be an integer >= 1, got -3"),
    "guidance NaN": (
        {"prompt": PROMPT, "guidance_scale": _fp32(math.nan)},
        None,
        GUIDANCE_MSG,
    ),
    "guidance 1e38": (
        {"prompt": PROMPT, "guidance_scale": _fp32(1e38)},
        None,
        GUIDANCE_MSG,
    ),
    "guidance -1": ({"prompt": PROMPT, "guidance_scale": _fp32(-1.0)}, None, "got -1.0"),
    "height 40": ({"prompt": PROMPT, "height": _int32(40)}, None, "multiples of 16 for this export, got 40x64"),
    "width 0": ({"prompt": PROMPT, "width": _int32(0)}, None, "width must be an integer >= 1, got 0"),
    "height -64": ({"prompt": PROMPT, "height": _int32(-64)}, None, "height must be an integer >= 1, got -64"),
    "size above max_pixels": (
        {"prompt": PROMPT, "height": _int32(256), "width": _int32(256)},
        None,
        "65,536 pixels, over this export's cap of 16,384",
    ),
    "huge size": (
        {"prompt": PROMPT, "height": _int32(8192), "width": _int32(8192)},
        None,
        "over this export's cap",
    ),
}
STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize(("protocol", "model"), [("http", MODEL), ("grpc", BACKEND_MODEL)])
def test_bad_request_is_refused_fast(server: TritonServer, protocol: str, model: str, case: str) -> None:
    spec, outputs, message = BAD_REQUESTS[case]
    client, module = _client(server, protocol)
    requested = None if outputs is None else [module.InferRequestedOutput(name) for name in outputs]
    start = time.perf_counter()
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _raw_inputs(module, spec), outputs=requested)
    seconds = time.perf_counter() - start
    assert err.value.status() == STATUS[protocol], (err.value.status(), str(err.value))
    assert message in str(err.value), str(err.value)
    assert seconds < FAST, f"refused after {seconds:.2f}s"


@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "model"), [("http", MODEL), ("grpc", BACKEND_MODEL)])
def test_model_keeps_serving_after_bad_requests(
    server: TritonServer, local: TGatePipeline, protocol: str, model: str
) -> None:
    client, module = _client(server, protocol)
    for spec, outputs, _ in list(BAD_REQUESTS.values())[::3]:
        requested = None if outputs is None else [module.InferRequestedOutput(name) for name in outputs]
        with pytest.raises(InferenceServerException):
            client.infer(model, _raw_inputs(module, spec), outputs=requested)
    image = client_script.generate(client, module, model, "a green triangle", seed=5, height=32, width=32)
    np.testing.assert_array_equal(image, _expected(local, "a green triangle", seed=5, height=32, width=32))


@pytest.mark.slow
def test_batch_of_prompts_and_truncated_tokens(server: TritonServer, local: TGatePipeline) -> None:
    """Several prompts give ``images`` [B, H, W, 3], equal to the pipeline's batch; a prompt past the text
    encoder window is reported in ``truncated_tokens`` (its token count; 0 for prompts that fit)."""
    long_prompt = " ".join(["red circle"] * 60)  # 120 tokens, past CLIP's 75
    prompts = ["a red circle", long_prompt, "a blue square"]
    client, module = _client(server, "http")
    inputs = _raw_inputs(
        module,
        {
            "prompt": _bytes(*[p.encode() for p in prompts]),
            "negative_prompt": _bytes(b"blurry"),
            "seed": ("INT64", np.array([11], np.int64)),
            "height": _int32(32),
            "width": _int32(32),
        },
    )
    outputs = [module.InferRequestedOutput("images"), module.InferRequestedOutput("truncated_tokens")]
    result = client.infer(MODEL, inputs, outputs=outputs)
    images, truncated = result.as_numpy("images"), result.as_numpy("truncated_tokens")
    expected = local(
        prompts, negative_prompt="blurry", num_inference_steps=STEPS, gate_step=GATE, height=32, width=32, seed=11
    )
    assert images.shape == (3, 32, 32, 3)
    for got, want in zip(images, expected.images, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want.convert("RGB"), dtype=np.uint8))
    assert truncated.tolist() == [0, expected.truncated[1], 0] and expected.truncated[1] > 75
    one = client.infer(MODEL, _raw_inputs(module, {"prompt": PROMPT}), outputs=[module.InferRequestedOutput("image")])
    assert one.as_numpy("image").shape == (64, 64, 3)  # one prompt: 'image' as before


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
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_v2_requests_equal_local_pipeline(
    server: TritonServer, v2_export: Callable[[str], Path], local: TGatePipeline, protocol: str
) -> None:
    """T-GATE V2 through Triton: sp_interval / fi_interval / warm_up reach the plan; a V1 model refuses them."""
    v2 = TGatePipeline.from_export(v2_export("tiny"), threads=THREADS)
    client, module = _client(server, protocol)
    params = {"seed": 2, "steps": 8, "gate_step": 5, "sp_interval": 3, "fi_interval": 2, "warm_up": 1}
    image = client_script.generate(client, module, V2_MODEL, "a red circle", **params)
    result = v2("a red circle", num_inference_steps=8, gate_step=5, seed=2, sp_interval=3, fi_interval=2, warm_up=1)
    np.testing.assert_array_equal(image, np.asarray(result.images[0].convert("RGB"), dtype=np.uint8))
    assert result.calls["unet_r1"] > 0 and result.calls["unet_post_r12"] > 0  # the request really was V2
    with pytest.raises(InferenceServerException, match="--schedule v2"):
        client_script.generate(client, module, MODEL, "a red circle", sp_interval=2)
    with pytest.raises(InferenceServerException, match="fi_interval must be an integer"):
        client_script.generate(client, module, V2_MODEL, "a red circle", fi_interval=0)


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


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "graph modified": (lambda a: _flip_last_byte(a / "vae_decoder" / "model.onnx"), ("sha256", "vae_decoder")),
    "tokenizer file missing": (lambda a: (a / "tokenizer" / "vocab.json").unlink(), ("missing", "vocab.json")),
    "scheduler config modified": (
        lambda a: (a / "scheduler" / "scheduler_config.json").write_text("{}"),
        ("sha256", "scheduler_config.json"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_repository_copy_is_refused_at_load(server: TritonServer, tiny_export: Path, damage: str) -> None:
    """The copy in the repository is checked like the export itself (sha256 of every file) when it loads."""
    name = f"tgate_damaged_{list(DAMAGE).index(damage)}"
    _generate_repo(tiny_export, server.repo, name, "--form", "backend")
    harm, fragments = DAMAGE[damage]
    harm(server.repo / name / "1" / "artifacts")
    client, _ = _client(server, "http")
    with pytest.raises(InferenceServerException) as err:
        client.load_model(name)
    assert all(f in str(err.value) for f in fragments), str(err.value)
    assert client.is_model_ready(MODEL) and client.is_model_ready(BACKEND_MODEL)
    assert not client.is_model_ready(name)


def _parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_gpu_trt_config(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    argv = [str(tiny_export), "--repo", str(repo), "--name", "sd15_gpu", "--kind", "gpu", "--backend", "trt"]
    assert cli.main([*argv, "--instances", "2", "--link", "--max-steps", "40", "--max-batch", "2"]) == 0
    assert "no TensorRT engines" in capsys.readouterr().err  # tiny has none; the config is still written
    config = _parse_config(repo / "sd15_gpu" / "config.pbtxt")
    assert config.name == "sd15_gpu" and config.backend == "python" and config.max_batch_size == 0
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    manifest = TGatePipeline.from_export(tiny_export).manifest
    defaults = manifest.defaults
    assert params["backend"] == "trt" and params["artifacts"] == str(tiny_export.resolve())
    assert params["max_steps"] == "40" and params["default_steps"] == str(defaults["steps"])
    assert params["default_gate_step"] == str(defaults["gate_step"])
    assert float(params["default_guidance_scale"]) == defaults["guidance_scale"]
    assert (params["default_height"], params["default_width"]) == (str(defaults["height"]), str(defaults["width"]))
    assert params["max_pixels"] == str(manifest.pixel_cap(share=2)) and params["max_batch"] == "2"
    assert params["size_multiple"] == str(manifest.size_multiple) and params["queue"] == "model"
    assert Path(params["EXECUTION_ENV_PATH"], "bin", "activate").is_file()
    inputs = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert inputs == {
        "prompt": ("TYPE_STRING", [-1], False),
        "negative_prompt": ("TYPE_STRING", [-1], True),
        "seed": ("TYPE_INT64", [1], True),
        "steps": ("TYPE_INT32", [1], True),
        "gate_step": ("TYPE_INT32", [1], True),
        "guidance_scale": ("TYPE_FP32", [1], True),
        "height": ("TYPE_INT32", [1], True),
        "width": ("TYPE_INT32", [1], True),
        "sp_interval": ("TYPE_INT32", [1], True),
        "fi_interval": ("TYPE_INT32", [1], True),
        "warm_up": ("TYPE_INT32", [1], True),
    }
    assert params["schedule"] == "v1" and params["default_sp_interval"] == "1" and params["default_warm_up"] == "0"
    outputs = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert outputs == {
        "image": ("TYPE_UINT8", [-1, -1, 3]),
        "images": ("TYPE_UINT8", [-1, -1, -1, 3]),
        "truncated_tokens": ("TYPE_INT32", [-1]),
    }
    assert (repo / "sd15_gpu" / "1" / "model.py").is_file() and not (repo / "sd15_gpu" / "1" / "artifacts").exists()


def test_generator_force_replaces_only_its_own_model(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    base = [str(tiny_export), "--repo", str(repo), "--link"]
    assert cli.main(base) == 0
    assert cli.main(base) == 2  # the model exists
    assert "--force" in capsys.readouterr().err
    assert cli.main([*base, "--force", "--instances", "3", "--max-pixels", "9216"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["sd15_tgate"]  # no temp folders or locks left behind
    config = (repo / "sd15_tgate" / "config.pbtxt").read_text()
    assert "count: 3" in config and '"max_pixels" value: { string_value: "9216" }' in config


def _tree(root: Path) -> dict[str, float]:
    """Every path under ``root``, with the files' modification times (a folder's own changes on a probe)."""
    return {str(p.relative_to(root)): 0.0 if p.is_dir() else p.stat().st_mtime for p in root.rglob("*")}


def _damaged_export(tiny_export: Path, tmp_path: Path, harm: Callable[[Path], None]) -> Path:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    harm(export)
    return export


def _not_ours(tmp_path: Path) -> None:
    (tmp_path / "repo" / "sd15_tgate").mkdir(parents=True)
    (tmp_path / "repo" / "sd15_tgate" / "notes.txt").write_text("someone else's model")


def _busy_port(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _busy_port.sock = sock  # type: ignore[attr-defined]  # held until the next case
    (tmp_path / "port").write_text(str(sock.getsockname()[1]))


def _serve_repo(tmp_path: Path) -> None:
    (tmp_path / "served" / "m").mkdir(parents=True)
    (tmp_path / "served" / "m" / "config.pbtxt").write_text('name: "m"\n')


# case -> (set-up in tmp_path, argv with {export}/{tmp}/{port} placeholders, a fragment of the one-line error)
BAD_CLI: dict[str, tuple[Callable[[Path], None] | None, list[str], str]] = {
    "no mode": (None, ["{export}"], "give exactly one of"),
    "two modes": (None, ["--as-backend", "{tmp}/b", "--repo", "{tmp}/repo"], "give exactly one of"),
    "--repo without export": (None, ["--repo", "{tmp}/repo"], "--repo needs EXPORT_DIR"),
    "unknown flag": (None, ["{export}", "--repo", "{tmp}/repo", "--frobnicate"], "unrecognized arguments"),
    "bad --queue": (None, ["{export}", "--repo", "{tmp}/repo", "--queue", "fifo"], "invalid choice"),
    "export missing": (None, ["{tmp}/missing", "--repo", "{tmp}/repo"], "does not exist"),
    "not an export": (lambda t: (t / "plain").mkdir(), ["{tmp}/plain", "--repo", "{tmp}/repo"], "no manifest.json"),
    "graph modified": (None, ["{damaged:graph}", "--repo", "{tmp}/repo"], "sha256"),
    "tokenizer missing": (None, ["{damaged:tokenizer}", "--repo", "{tmp}/repo"], "vocab.json is missing"),
    "repo inside the export": (None, ["{copy}", "--repo", "{copy}/models"], "which this command reads"),
    "model exists, no --force": (None, ["{export}", "--repo", "{tmp}/repo", "--link", "--again"], "--force"),
    "--force on a folder not ours": (_not_ours, ["{export}", "--repo", "{tmp}/repo", "--force"], "not an output of"),
    "--name with a slash": (None, ["{export}", "--repo", "{tmp}/repo", "--name", "a/b"], "plain folder name"),
    "--kind cpu --backend trt": (None, ["{export}", "--repo", "{tmp}/repo", "--backend", "trt"], "--kind gpu"),
    "--instances 0": (None, ["{export}", "--repo", "{tmp}/repo", "--instances", "0"], "--instances must be >= 1"),
    "--threads -1": (None, ["{export}", "--repo", "{tmp}/repo", "--threads", "-1"], "must be an integer in 0..1024"),
    "--max-steps 3 (below the default steps)": (
        None,
        ["{export}", "--repo", "{tmp}/repo", "--max-steps", "3"],
        "max_steps",
    ),
    "--max-steps 1001": (None, ["{export}", "--repo", "{tmp}/repo", "--max-steps", "1001"], "in 1..1000"),
    "--gate 0": (None, ["{export}", "--repo", "{tmp}/repo", "--gate", "0"], "--gate must be an integer >= 1"),
    "--guidance nan": (None, ["{export}", "--repo", "{tmp}/repo", "--guidance", "nan"], "finite number in 0..100"),
    "--max-pixels 0": (None, ["{export}", "--repo", "{tmp}/repo", "--max-pixels", "0"], "--max-pixels must be"),
    "--max-pixels below the default size": (
        None,
        ["{export}", "--repo", "{tmp}/repo", "--max-pixels", "1000"],
        "the default image size does not fit",
    ),
    "--max-batch 65": (None, ["{export}", "--repo", "{tmp}/repo", "--max-batch", "65"], "in 1..64"),
    "--env not a folder": (None, ["{export}", "--repo", "{tmp}/repo", "--env", "{tmp}/nowhere"], "not a folder"),
    "--serve a missing folder": (None, ["--serve", "{tmp}/nothing"], "no such folder"),
    "--serve a folder with no model": (lambda t: (t / "empty").mkdir(), ["--serve", "{tmp}/empty"], "holds no model"),
    "--serve --http-port 70000": (_serve_repo, ["--serve", "{tmp}/served", "--http-port", "70000"], "1..65535"),
    "--serve, same ports": (
        _serve_repo,
        ["--serve", "{tmp}/served", "--http-port", "8500", "--grpc-port", "8500"],
        "must differ",
    ),
    "--serve, port in use": (
        lambda t: (_serve_repo(t), _busy_port(t)),  # type: ignore[func-returns-value]
        ["--serve", "{tmp}/served", "--http-port", "{port}"],
        "in use",
    ),
}


def _argv(argv: list[str], tiny_export: Path, tmp_path: Path) -> list[str]:
    damaged = {
        "{damaged:graph}": lambda e: _flip_last_byte(e / "unet" / "unet_pregate.onnx"),
        "{damaged:tokenizer}": lambda e: (e / "tokenizer" / "vocab.json").unlink(),
    }
    out = []
    for arg in argv:
        if arg in damaged:
            arg = str(_damaged_export(tiny_export, tmp_path, damaged[arg]))
        elif arg.startswith("{copy}"):
            if not (tmp_path / "export").exists():
                shutil.copytree(tiny_export, tmp_path / "export")
            arg = arg.replace("{copy}", str(tmp_path / "export"))
        port = (tmp_path / "port").read_text() if (tmp_path / "port").exists() else ""
        out.append(arg.replace("{export}", str(tiny_export)).replace("{tmp}", str(tmp_path)).replace("{port}", port))
    return out


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_cli_exits_2_with_one_line_and_writes_nothing(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    setup, argv, message = BAD_CLI[case]
    if setup is not None:
        setup(tmp_path)
    if "--again" in argv:  # the model is there already
        argv = [a for a in argv if a != "--again"]
        assert cli.main(_argv(argv, tiny_export, tmp_path)) == 0
        capsys.readouterr()
    args = _argv(argv, tiny_export, tmp_path)
    before, export_before = _tree(tmp_path), _tree(tiny_export)
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own errors (Parser.error exits 2)
        code = int(exc.code or 0)
    finally:
        sock = getattr(_busy_port, "sock", None)
        if sock is not None:
            sock.close()
            del _busy_port.sock  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgate-triton: error: "), err
    assert message in lines[0], lines[0]
    assert _tree(tmp_path) == before, "the failed run changed files"
    assert _tree(tiny_export) == export_before


def test_cli_error_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point: exit status 2, one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "tgate_trt.triton.cli", str(tmp_path / "missing"), "--repo", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tgate-triton: error: "), proc.stderr
    assert not (tmp_path / "r").exists()


def test_serve_log_must_be_a_writable_file(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--serve keeps tritonserver's log at --log (default out/triton/tritonserver.log): checked before starting."""
    repo = tmp_path / "repo"
    _generate_repo(tiny_export, repo, "tiny_tgate", "--link")
    ports = ["--http-port", "18900", "--grpc-port", "18901", "--health-port", "0"]
    assert cli.main(["--serve", str(repo), *ports, "--log", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tgate-triton: error: --log") and "is a folder" in err
    assert cli.main(["--serve", str(repo), *ports, "--log", str(tmp_path / "no" / "such" / "x.log")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.build_parser().get_default("log") == Path("out/triton/tritonserver.log")


def test_as_backend_installs_model_py(tmp_path: Path) -> None:
    assert cli.main(["--as-backend", str(tmp_path / "backends")]) == 0
    installed = tmp_path / "backends" / "tgate" / "model.py"
    assert installed.read_text() == (Path(cli.__file__).with_name("model.py")).read_text()


def test_parse_request_without_a_server() -> None:
    from tgate_trt.contract import limits
    from tgate_trt.triton.contract import RequestError, Settings, parse_request

    settings = Settings(steps=4, gate_step=2, guidance_scale=7.5, height=64, width=64, max_steps=8, size_multiple=16)
    inputs: dict[str, np.ndarray] = {"prompt": np.array([b"a cat"], dtype=np.object_)}
    req = parse_request(inputs.get, settings)
    assert (req.prompts, req.negative_prompts, req.seed, req.steps, req.gate_step) == (["a cat"], None, 0, 4, 2)
    assert (req.guidance_scale, req.height, req.width) == (7.5, 64, 64)
    assert settings.pixel_cap == limits.default_max_pixels(64, 64)
    bad = {
        "prompt": (np.array([b"\xff\xfe"], dtype=np.object_), "UTF-8"),
        "seed": (np.array([-1], np.int64), "seed"),
        "guidance_scale": (np.array([np.nan], np.float32), "finite"),
        "width": (np.array([0], np.int32), "width must be an integer >= 1"),
        "steps": (np.array([1, 2], np.int32), "exactly one value"),
    }
    for name, (array, message) in bad.items():
        with pytest.raises(RequestError, match=message):
            parse_request({**inputs, name: array}.get, settings)
    # the same bounds, and the same words, as the CLI and the Python API
    for name, value, check in [
        ("seed", np.array([-5], np.int64), lambda: limits.check_seed(-5)),
        ("guidance_scale", np.array([101.0], np.float32), lambda: limits.check_guidance(101.0)),
        ("gate_step", np.array([0], np.int32), lambda: limits.check_gate(4, 0)),
    ]:
        with pytest.raises(ValueError) as want:
            check()
        with pytest.raises(RequestError) as got:
            parse_request({**inputs, name: value}.get, settings)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="max_steps"):
        Settings(steps=9, gate_step=2, guidance_scale=7.5, height=64, width=64, max_steps=8).check()
    with pytest.raises(ValueError, match="default image size"):
        Settings(steps=4, gate_step=2, guidance_scale=7.5, height=64, width=64, max_pixels=100).check()
