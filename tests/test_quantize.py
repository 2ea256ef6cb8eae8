"""``tgate-quantize``: a real int8 copy of the tiny export, run by the real pipeline, and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tgate_trt import manifest as mf
from tgate_trt.contract.errors import UserError
from tgate_trt.export.quantize import DEFAULT_TOLERANCE, QuantizeError, main, quantize_export
from tgate_trt.runtime.pipeline import TGatePipeline


@pytest.fixture(scope="module")
def int8_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    quantize_export(tiny_export, out)
    return out


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_int8_copy_keeps_the_contract_and_records_itself(tiny_export: Path, int8_export: Path) -> None:
    src, q = mf.Manifest.load(tiny_export), mf.Manifest.load(int8_export, verify=True)  # every sha256 checked
    section = q.extra[mf.QUANTIZATION]
    assert section["ops"] == ["MatMul"] and section["source_manifest_sha256"] == mf.sha256_file(
        tiny_export / mf.MANIFEST_NAME
    )
    for key in (mf.PREGATE, mf.POSTGATE):
        assert q.graphs[key].inputs == src.graphs[key].inputs and q.graphs[key].outputs == src.graphs[key].outputs
        assert q.graphs[key].files != src.graphs[key].files
        ops = _ops(int8_export / q.graphs[key].file)
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Conv" in ops  # convolutions stay fp32
        errors = section["check"]["errors"][key]
        assert set(errors) == {o.name for o in q.graphs[key].outputs}
        assert 0 < max(errors.values()) <= DEFAULT_TOLERANCE
    for key in (mf.TEXT_ENCODER, mf.VAE_DECODER):  # copied unchanged
        assert q.graphs[key].files == src.graphs[key].files
    assert not [p for p in int8_export.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_int8_pipeline_follows_the_fp32_one(tiny_export: Path, int8_export: Path) -> None:
    kw = {"num_inference_steps": 8, "gate_step": 3, "seed": 2}
    fp32 = TGatePipeline.from_export(tiny_export)("a red circle", **kw)
    int8_pipe = TGatePipeline.from_export(int8_export)
    int8 = int8_pipe("a red circle", **kw)
    assert int8_pipe.engines[mf.PREGATE].calls == 3 and int8_pipe.engines[mf.POSTGATE].calls == 5
    rel = np.linalg.norm(int8.latents - fp32.latents) / np.linalg.norm(fp32.latents)
    assert 0 < rel < 0.05, rel  # int8 changes the numbers a little, not the picture
    mad = np.abs(np.asarray(int8.images[0], float) - np.asarray(fp32.images[0], float)).mean()
    assert mad < 2.0, mad


def test_refusals_write_nothing(tiny_export: Path, int8_export: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_export(int8_export, tmp_path / "again")
    with pytest.raises(UserError, match="which this command reads"):
        quantize_export(tiny_export, tiny_export)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        quantize_export(tiny_export, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(QuantizeError, match="tolerance"):
        quantize_export(tiny_export, tmp_path / "strict", tolerance=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # the failed check left no folder
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_engines_are_built_from_the_source_not_the_int8_copy(int8_export: Path, tmp_path: Path) -> None:
    from tgate_trt.engines.build import build_engines
    from tgate_trt.engines.options import BuildOptions

    with pytest.raises(ValueError, match="tgate-quantize"):  # refused before TensorRT is even imported
        build_engines(int8_export, tmp_path / "plans", BuildOptions(), 1, 64, 64)
    assert not (tmp_path / "plans").exists()
