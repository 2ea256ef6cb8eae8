"""The TensorRT runtime backend without TensorRT or a GPU: plan compatibility checks and the backend's
buffer logic (shared activations, zero-copy gate) against a fake engine on CPU tensors. The real build
and run skip with the reason where the TensorRT builder or a CUDA GPU is absent."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tgate_trt import manifest as mf
from tgate_trt.engines.build import TensorRTMissing, build_engines, import_tensorrt
from tgate_trt.engines.options import BuildOptions
from tgate_trt.engines.profiles import concrete_shape
from tgate_trt.runtime.trt_engine import PlanMismatch, SharedActivations, TrtEngine, check_plan


@pytest.fixture(scope="module")
def manifest(tiny_export: Path) -> mf.Manifest:
    return mf.Manifest.load(tiny_export)


def _real_tensorrt() -> Any:
    try:
        return import_tensorrt()
    except TensorRTMissing as exc:
        pytest.skip(f"needs the TensorRT builder: {exc}")


# --- plan compatibility (pure) -----------------------------------------------------------------------
SECTION = {
    "tensorrt": "10.13.0.35",
    "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
    "options": BuildOptions().to_dict(),
    "plans": {mf.PREGATE: {"file": "unet_pregate.plan", "sha256": "ab" * 32}},
}
OK = {"trt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "plan_sha256": "ab" * 32}


def test_check_plan_accepts_a_matching_plan() -> None:
    check_plan(SECTION, mf.PREGATE, **OK)


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"plan_sha256": "cd" * 32}, ["cdcdcdcdcdcdcdcd", "abababababababab"]),
        ({"trt_version": "10.14.1.48"}, ["10.13.0.35", "10.14.1.48"]),
        ({"gpu_name": "NVIDIA A100-SXM4-40GB"}, ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]),
    ],
)
def test_check_plan_refuses_with_both_values(changes: dict[str, str], shown: list[str]) -> None:
    with pytest.raises(PlanMismatch) as info:
        check_plan(SECTION, mf.PREGATE, **{**OK, **changes})
    assert all(s in str(info.value) for s in shown) and "tgate-build" in str(info.value)


def test_check_plan_compatibility_options() -> None:
    vc = {**SECTION, "options": BuildOptions(version_compatible=True).to_dict()}
    check_plan(vc, mf.PREGATE, **{**OK, "trt_version": "10.14.1.48"})  # later 10.x: fine
    for version in ("10.12.0.36", "11.0.0.1"):
        with pytest.raises(PlanMismatch, match="same major version"):
            check_plan(vc, mf.PREGATE, **{**OK, "trt_version": version})
    hc = {**SECTION, "options": BuildOptions(hardware_compat="ampere+").to_dict()}
    check_plan(hc, mf.PREGATE, **{**OK, "gpu_name": "NVIDIA A100-SXM4-40GB"})
    with pytest.raises(PlanMismatch, match="no plan for unet_postgate"):
        check_plan(SECTION, mf.POSTGATE, **OK)


# --- the TRT backend's buffers, against a fake engine on CPU tensors ---------------------------------
class FakeContext:
    def __init__(self, shapes: dict[str, Any]) -> None:
        self.shapes, self.addresses, self.input_shapes, self.memory = shapes, {}, {}, None
        self.runs = 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.input_shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name](self.input_shapes))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.runs += 1
        return True


def _fake_engine(manifest: mf.Manifest, key: str, memory: int) -> Any:
    spec = manifest.graphs[key]
    names = [t.name for t in spec.inputs + spec.outputs]
    inputs = {t.name for t in spec.inputs}

    def output_shape(out: mf.TensorSpec) -> Any:
        def shape(input_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
            b, _, h, w = input_shapes[mf.SAMPLE]
            return concrete_shape(manifest, key, out.shape, b, h * 8, w * 8)

        return shape

    ctx = FakeContext({o.name: output_shape(o) for o in spec.outputs})
    return types.SimpleNamespace(
        num_io_tensors=len(names),
        get_tensor_name=names.__getitem__,
        get_tensor_mode=lambda n: "INPUT" if n in inputs else "OUTPUT",
        get_tensor_dtype=lambda n: types.SimpleNamespace(name="FLOAT"),
        device_memory_size_v2=memory,
        create_execution_context=lambda strategy: ctx if strategy == "USER_MANAGED" else None,
        ctx=ctx,
    )


class FakeStream:
    cuda_stream = 0

    def synchronize(self) -> None:
        pass


def test_trt_backend_shares_activations_and_gates_without_copy(
    manifest: mf.Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_trt = types.SimpleNamespace(
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
    )
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    shared = SharedActivations("cpu")
    pre_e, post_e = _fake_engine(manifest, mf.PREGATE, 1000), _fake_engine(manifest, mf.POSTGATE, 4000)
    pre = TrtEngine(mf.PREGATE, manifest.graphs[mf.PREGATE], pre_e, shared, FakeStream())  # type: ignore[arg-type]
    assert pre_e.ctx.memory[1] >= 1000
    post = TrtEngine(mf.POSTGATE, manifest.graphs[mf.POSTGATE], post_e, shared, FakeStream())  # type: ignore[arg-type]
    assert pre_e.ctx.memory == post_e.ctx.memory and shared.size >= 4000  # grown, both re-pointed

    x = np.zeros((2, 4, 8, 8), np.float32)
    embeds = pre.asarray(np.zeros((2, 77, 32), np.float32), mf.PROMPT_EMBEDS)
    feeds = {mf.SAMPLE: x, mf.TIMESTEP: np.ones(1, np.float32), mf.PROMPT_EMBEDS: embeds,
             mf.NEGATIVE_PROMPT_EMBEDS: embeds, mf.GUIDANCE_SCALE: np.ones(1, np.float32)}  # fmt: skip
    first = pre(feeds)
    second = pre(feeds)
    assert all(first[n] is second[n] for n in first)  # preallocated outputs, returned as-is
    assert first["cache_01"].shape == (2, 16, 64)
    caches = {n: second[n] for n in manifest.cache_names}
    post({mf.SAMPLE: x, mf.TIMESTEP: np.ones(1, np.float32), **caches})
    for name, tensor in caches.items():  # the post-gate engine reads the pre-gate buffers: no copy
        assert post_e.ctx.addresses[name] == tensor.data_ptr() == pre_e.ctx.addresses[name]
    assert (pre.calls, post.calls, pre_e.ctx.runs, post_e.ctx.runs) == (2, 1, 2, 1)
    assert isinstance(pre.numpy(second[mf.NOISE_PRED]), np.ndarray)


# --- real TensorRT + GPU ------------------------------------------------------------------------------
def test_build_and_run_tiny_engines_match_ort(tiny_export: Path, tmp_path: Path) -> None:
    trt = _real_tensorrt()
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch (a CUDA build of torch)")
    from tgate_trt.runtime.pipeline import TGatePipeline
    from tgate_trt.runtime.trt_engine import load_engines

    section = build_engines(tiny_export, tmp_path / "plans", BuildOptions(), 1, 64, 64)
    assert section["tensorrt"] == trt.__version__ and set(section["plans"]) == set(mf.GRAPH_KEYS)
    ref = TGatePipeline.from_export(tiny_export)
    engines = load_engines(tiny_export, tmp_path / "plans", cuda_graphs=True)
    pipe = TGatePipeline(tiny_export, ref.manifest, dict(engines), ref.tokenizer)
    a = ref("a red circle", num_inference_steps=10, gate_step=4, seed=0)
    b = pipe("a red circle", num_inference_steps=10, gate_step=4, seed=0)
    assert np.abs(a.latents - b.latents).max() < 1e-2
    assert b.calls[mf.PREGATE] == 4 and b.calls[mf.POSTGATE] == 6
