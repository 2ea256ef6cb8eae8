"""The OpenVINO target: real builds of ``tiny`` and ``shapes``, real OpenVINO sessions, compared with ORT fp32."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino (the openvino extra) is not installed")

from tgate_trt import manifest as mf  # noqa: E402
from tgate_trt.contract.files import MARKER  # noqa: E402
from tgate_trt.engines import cli as build_cli  # noqa: E402
from tgate_trt.engines import openvino as ovb  # noqa: E402
from tgate_trt.runtime import cli as run_cli  # noqa: E402
from tgate_trt.runtime.ov_engine import OvEngine, OvMismatch  # noqa: E402
from tgate_trt.runtime.pipeline import TGatePipeline  # noqa: E402
from tgate_trt.zoo.shapes import data  # noqa: E402
from tgate_trt.zoo.shapes.judge import accuracy  # noqa: E402

HAS_BF16 = ovb.supports_bf16(ov.Core())
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (AMX or AVX-512 BF16)")
PRECISIONS = ["f32", pytest.param("bf16", marks=needs_bf16), "int8w"]
# Final latents against ORT fp32 on tiny (25 steps, gate 10, 2 prompts), relative L2. Measured: f32 1.0e-6,
# bf16 9.6e-3, int8w 1.3e-2 (shapes: 8.5e-3 and 1.8e-2); bounds leave about 2x room.
LATENT_BOUNDS = {"bf16": 3e-2, "int8w": 5e-2}
PROMPTS = ["a red circle on the left", "a blue square on the right"]
RUN = {"num_inference_steps": 25, "gate_step": 10, "seed": 0}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _build(export: Path, precision: str, name: str | None = None) -> int:
    argv = [str(export), "--target", "openvino", "--precision", precision]
    return build_cli.main(argv + (["--out", str(export / name)] if name else []))


def _with_builds(src: Path, dst: Path) -> Path:
    """A copy of an export with one OpenVINO build per precision this CPU has (``openvino-<precision>``)."""
    export = _copy(src, dst)
    for precision in ("f32", "bf16", "int8w") if HAS_BF16 else ("f32", "int8w"):
        assert _build(export, precision, f"openvino-{precision}") == 0
    return export


@pytest.fixture(scope="module")
def tiny_ov(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_builds(tiny_export, tmp_path_factory.mktemp("ov") / "tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def ort_result(tiny_export: Path) -> object:
    return TGatePipeline.from_export(tiny_export)(PROMPTS, **RUN)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_build_records_files_versions_and_validation(tiny_ov: Path, precision: str) -> None:
    name = f"openvino-{precision}"
    section = mf.Manifest.load(tiny_ov).extra["engines"][name]
    assert section["target"] == "openvino" and section["openvino"] == ov.get_version()
    assert section["device"] == "CPU" and section["precision"] == precision
    assert set(section["graphs"]) == set(mf.Manifest.load(tiny_ov).graphs)
    for key, graph in section["graphs"].items():
        assert (tiny_ov / graph["xml"]).is_file() and len(graph["files"]) == 2
        for rel, digest in graph["files"].items():
            assert mf.sha256_file(tiny_ov / rel) == digest
        if key == mf.TEXT_ENCODER and precision != "f32":
            assert graph["inference"] == "f32" and graph["weights"] == "f32" and graph["note"]  # kept f32, with why
        elif key != mf.TEXT_ENCODER:
            assert graph["inference"] == ("bf16" if precision in ("bf16", "int8w") and HAS_BF16 else "f32")
            assert graph["weights"] == ("int8" if precision == "int8w" else "f32")
    rows = section["validation"]["rows"]
    assert [r["graph"] for r in rows] == list(section["graphs"]) and all(r["passed"] for r in rows)
    assert all(r["relative_l2"] <= r["tolerance"] for r in rows)
    assert not [p for p in tiny_ov.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no staging left


def test_f32_latents_match_ort(tiny_ov: Path, ort_result: object, cache_dir: Path) -> None:
    pipe = TGatePipeline.from_export(tiny_ov, backend="openvino", engines="openvino-f32", cache_dir=cache_dir)
    result = pipe(PROMPTS, **RUN)
    assert np.abs(result.latents - ort_result.latents).max() <= 1e-4  # type: ignore[attr-defined]
    assert result.calls == {mf.TEXT_ENCODER: 1, mf.PREGATE: 10, mf.POSTGATE: 15, mf.VAE_DECODER: 1}


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_bf16), "int8w"])
def test_low_precision_latents_within_measured_bound(
    tiny_ov: Path, ort_result: object, cache_dir: Path, precision: str
) -> None:
    pipe = TGatePipeline.from_export(tiny_ov, backend="openvino", engines=f"openvino-{precision}", cache_dir=cache_dir)
    got, want = pipe(PROMPTS, **RUN).latents, ort_result.latents  # type: ignore[attr-defined]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 0 < rel <= LATENT_BOUNDS[precision], rel


def test_cache_handoff_shares_memory(tiny_ov: Path, cache_dir: Path) -> None:
    """The post-gate request reads the very buffers the pre-gate request wrote: no copy at the gate."""
    pipe = TGatePipeline.from_export(tiny_ov, backend="openvino", engines="openvino-f32", cache_dir=cache_dir)
    pipe(PROMPTS[0], num_inference_steps=4, gate_step=2, seed=1)
    pre, post = pipe.engines[mf.PREGATE], pipe.engines[mf.POSTGATE]
    assert isinstance(pre, OvEngine) and isinstance(post, OvEngine)
    for name in pipe.manifest.cache_names:
        written, read = pre.request.get_tensor(name).data, post.request.get_tensor(name).data
        assert written.size > 0 and np.shares_memory(written, read), name
    # and the noise prediction is not shared: a control that the check above can fail
    assert not np.shares_memory(pre.request.get_tensor(mf.SAMPLE).data, post.request.get_tensor(mf.SAMPLE).data)


@pytest.mark.parametrize("static", [True, False])
def test_second_start_loads_compiled_models_from_cache(tiny_ov: Path, tmp_path: Path, static: bool) -> None:
    def start() -> TGatePipeline:
        pipe = TGatePipeline.from_export(
            tiny_ov, backend="openvino", engines="openvino-f32", cache_dir=tmp_path, static_shapes=static
        )
        pipe(PROMPTS[0], num_inference_steps=3, gate_step=2, seed=0)  # static graphs compile on first use
        return pipe

    first = start()
    blobs = sorted(p.name for p in tmp_path.iterdir())
    assert len(blobs) >= len(first.engines)
    assert not any(e.loaded_from_cache for e in first.engines.values())  # type: ignore[attr-defined]
    second = start()
    assert all(e.loaded_from_cache for e in second.engines.values())  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == blobs


def test_static_graphs_follow_the_size_and_equal_dynamic(tiny_ov: Path, cache_dir: Path) -> None:
    """Static compilation is per shape: a new size recompiles, and the numbers equal the dynamic graphs'."""
    kw = {"backend": "openvino", "engines": "openvino-f32", "cache_dir": cache_dir}
    static = TGatePipeline.from_export(tiny_ov, **kw)  # type: ignore[arg-type]
    dynamic = TGatePipeline.from_export(tiny_ov, static_shapes=False, **kw)  # type: ignore[arg-type]
    for size in (64, 32):
        a = static(PROMPTS[0], num_inference_steps=4, gate_step=2, seed=2, height=size, width=size)
        b = dynamic(PROMPTS[0], num_inference_steps=4, gate_step=2, seed=2, height=size, width=size)
        assert a.latents.shape == (1, 4, size // 8, size // 8)
        np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)  # kernels differ by shape: ~2e-5 seen
        assert static.engines[mf.POSTGATE].shapes[mf.SAMPLE] == (1, 4, size // 8, size // 8)  # type: ignore[attr-defined]


def _edit_section(export: Path, name: str, **changes: str) -> None:
    path = export / mf.MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["extra"]["engines"][name].update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [({"openvino": "2024.0.0-1-old"}, "made with OpenVINO 2024.0.0-1-old"), ({"device": "GPU"}, "made for GPU")],
)
def test_other_version_or_device_is_refused(
    tiny_ov: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    export = _copy(tiny_ov, tmp_path / "export")
    _edit_section(export, "openvino-f32", **change)
    with pytest.raises(OvMismatch, match="rebuild"):
        TGatePipeline.from_export(export, backend="openvino", engines="openvino-f32", cache_dir="")
    argv = [str(export), "a red circle", "--backend", "openvino", "--engines", "openvino-f32"]
    assert run_cli.main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "rebuild" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("suffix", [".xml", ".bin"])
def test_tampered_ir_is_refused_by_name(tiny_ov: Path, tmp_path: Path, suffix: str) -> None:
    export = _copy(tiny_ov, tmp_path / "export")
    target = export / "openvino-f32" / f"{mf.POSTGATE}{suffix}"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    with pytest.raises(OvMismatch, match=f"{mf.POSTGATE}\\{suffix} does not match its sha256"):
        TGatePipeline.from_export(export, backend="openvino", engines="openvino-f32", cache_dir="")


def test_graph_out_of_tolerance_fails_the_build_with_nothing_written(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    export = _copy(tiny_export, tmp_path / "export")
    before = (export / mf.MANIFEST_NAME).read_bytes()
    monkeypatch.setitem(ovb.TOLERANCES, "f32", 1e-12)  # no real graph agrees this closely
    assert _build(export, "f32") == 2
    captured = capsys.readouterr()
    assert "relative L2" in captured.err and "nothing was written" in captured.err
    assert "NO" in captured.out  # the validation table is shown
    assert (export / mf.MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in tiny_export.iterdir())


def test_build_refusals(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tgate_trt.export.quantize import quantize_export

    export = _copy(tiny_export, tmp_path / "export")
    cases: list[tuple[list[str], str]] = [
        ([str(export), "--out", str(tmp_path / "elsewhere")], "directly inside"),
        ([str(export), "--out", str(export / "unet_pregate")], "folder of its own"),
        ([str(export), "--device", "GPU"], "sees no GPU"),
        ([str(export), "--precision", "f16"], "f16 is for Intel GPUs"),
        ([str(tmp_path / "missing")], "does not exist"),
    ]
    if not HAS_BF16:
        cases.append(([str(export), "--precision", "bf16"], "no native bf16"))
    quantize_export(tiny_export, tmp_path / "int8")
    cases.append(([str(tmp_path / "int8")], "int8 copy for ONNX Runtime"))
    for argv, message in cases:
        assert build_cli.main([*argv, "--target", "openvino"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (export / "openvino").exists() and not (tmp_path / "elsewhere").exists()


def test_run_without_a_build_says_how_to_make_one(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(mf.ManifestError, match="tgate-build .* --target openvino"):
        TGatePipeline.from_export(tiny_export, backend="openvino")


def test_cli_run_and_default_precision(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = _copy(tiny_export, tmp_path / "export")
    assert build_cli.main([str(export), "--target", "openvino"]) == 0
    out = capsys.readouterr().out
    default = "bf16" if HAS_BF16 else "f32"
    assert mf.Manifest.load(export).extra["engines"]["openvino"]["precision"] == default
    assert "tgate-run" in out and "pass" in out
    png = tmp_path / "a.png"
    assert run_cli.main([str(export), "a red circle", "--backend", "openvino", "--steps", "4", "--out", str(png)]) == 0
    assert png.is_file()


@pytest.fixture(scope="module")
def shapes_ov(shapes_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_builds(shapes_export, tmp_path_factory.mktemp("ov-shapes") / "shapes")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_shapes_draws_what_it_is_asked(
    shapes_ov: Path, check_prompts: Callable[[], list[data.Spec]], precision: str
) -> None:
    """The trained model on every build (gate 10 of 25), judged like the ORT pipeline in test_shapes.py."""
    section = mf.Manifest.load(shapes_ov).extra["engines"][f"openvino-{precision}"]
    assert all(r["passed"] for r in section["validation"]["rows"])
    specs = check_prompts()
    pipe = TGatePipeline.from_export(shapes_ov, backend="openvino", engines=f"openvino-{precision}")
    result = pipe([s.caption for s in specs], num_inference_steps=25, gate_step=10, seed=0)
    acc = accuracy([np.asarray(im) for im in result.images], specs)
    assert acc["color"] == 1.0 and acc["position"] == 1.0 and acc["shape"] >= 5 / 6, acc


@pytest.mark.parametrize("variant", ["tiny-sdxl", "tiny-lcm", "tiny-sd21"])
def test_other_families_build_and_match_ort(
    model_export: Callable[[str], Path], tmp_path: Path, cache_dir: Path, variant: str
) -> None:
    """SDXL (two text encoders, added conditioning), guidance-free LCM and v-prediction SD-2.1 through the
    same build and backend: f32 latents equal ORT's, every graph runs as often as on ORT."""
    export = _copy(model_export(variant), tmp_path / variant)
    assert _build(export, "f32") == 0
    want = TGatePipeline.from_export(export)("a red circle", seed=1)
    got = TGatePipeline.from_export(export, backend="openvino", cache_dir=cache_dir)("a red circle", seed=1)
    assert np.abs(got.latents - want.latents).max() <= 1e-4
    assert got.calls == want.calls
