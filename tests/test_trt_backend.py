"""The TensorRT runtime backend without TensorRT or a GPU: plan compatibility checks and the backend's
buffer logic (shared activations, zero-copy cache hand-off between any two variants, CUDA-graph keying)
against a fake engine on CPU tensors, driven by the real sampler and step plans (V1 and V2). The real build
and run skip with the reason where the TensorRT builder or a CUDA GPU is absent."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engines import fix_gate_dims

from tgate_trt import manifest as mf
from tgate_trt.engines.build import TensorRTMissing, build_engines, import_tensorrt
from tgate_trt.engines.options import BuildOptions
from tgate_trt.engines.profiles import concrete_shape, profiles_for
from tgate_trt.methods.plan import TGateParams, plan
from tgate_trt.methods.sampler import denoise
from tgate_trt.methods.variants import GraphVariant, select
from tgate_trt.runtime.trt_engine import (
    PlanMismatch,
    SharedActivations,
    TrtEngine,
    check_plan,
    check_section,
    check_variants,
)


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


@pytest.fixture(scope="module")
def v2_manifest(v2_export: Callable[[str], Path]) -> mf.Manifest:
    return fix_gate_dims(mf.Manifest.load(v2_export("tiny")))


def test_check_section_needs_every_variant(v2_manifest: mf.Manifest) -> None:
    plans = {k: {"file": f"{k}.plan", "sha256": "ab" * 32, "variant": v2_manifest.variants.get(k)}
             for k in v2_manifest.graphs}  # fmt: skip
    check_section({**SECTION, "plans": plans}, v2_manifest)
    older = {k: {kk: vv for kk, vv in p.items() if kk != "variant"} for k, p in plans.items()}
    check_section({**SECTION, "plans": older}, v2_manifest)  # sections from before V2 record no variant
    without = {k: p for k, p in plans.items() if k != "unet_r1"}
    with pytest.raises(PlanMismatch, match="no plan for unet_r1 .*v2 graphs .*rebuild with tgate-build"):
        check_section({**SECTION, "plans": without}, v2_manifest)
    with pytest.raises(PlanMismatch, match="plans for unet_pregate, which this export does not have"):
        check_section({**SECTION, "plans": {**plans, mf.PREGATE: SECTION["plans"][mf.PREGATE]}}, v2_manifest)
    other = {**plans, "unet_r1": {**plans["unet_r1"], "variant": v2_manifest.variants["unet_c1"]}}
    with pytest.raises(PlanMismatch, match="unet_r1: the plan was built for variant"):
        check_section({**SECTION, "plans": other}, v2_manifest)


def test_check_variants(v2_manifest: mf.Manifest) -> None:
    variants = [GraphVariant.from_dict(k, v) for k, v in v2_manifest.variants.items()]
    check_variants(variants)
    bad = dataclasses.replace(variants[0], replay=frozenset({"attn1"}))  # unet_c1 captures attn1
    with pytest.raises(mf.ManifestError, match="unet_c1 both replays and captures attn1"):
        check_variants([bad])


# --- the TRT backend's buffers, against a fake engine on CPU tensors ---------------------------------
class FakeContext:
    def __init__(self, shapes: dict[str, Any]) -> None:
        self.shapes, self.addresses, self.input_shapes, self.memory = shapes, {}, {}, None
        self.runs = 0
        self.on_run: Callable[[dict[str, int]], None] | None = None  # what "the GPU" does with the addresses

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
        if self.on_run is not None:
            self.on_run(dict(self.addresses))
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


FAKE_TRT = types.SimpleNamespace(
    ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
    TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
)


class Device:
    """Stands in for the GPU: a run reads, at each cache input's bound address, the tag its producer wrote,
    and writes its own tag (the UNet call's index) into every output buffer at the addresses it was given.
    Addresses are resolved only among live engine buffers, so a dangling address fails the test."""

    def __init__(self) -> None:
        self.engines: list[TrtEngine] = []
        self.calls: list[tuple[str, dict[str, float], dict[str, int]]] = []  # (engine, tags read, addresses)
        self.replays = 0

    def find(self, ptr: int) -> torch.Tensor:
        for e in self.engines:
            for t in [*e.outputs.values(), *e._bound.values(), *e._staged.values()]:
                if t.data_ptr() == ptr:
                    return t
        raise AssertionError(f"address {ptr:#x} is no live buffer")

    def run(self, engine: TrtEngine, addresses: dict[str, int]) -> None:
        caches = [n for n in engine.input_names if n.startswith(("cache_", "self_"))]
        tags = {n: float(self.find(addresses[n]).flatten()[0]) for n in caches}
        for n in engine.output_names:
            self.find(addresses[n]).fill_(len(self.calls))
        self.calls.append((engine.name, tags, addresses))


class FakeGraph:
    def __init__(self, device: Device, engine: TrtEngine) -> None:
        self.device, self.engine, self.addresses = device, engine, dict(engine.context.addresses)

    def replay(self) -> None:  # a CUDA graph runs with the addresses it was captured with
        self.device.replays += 1
        self.device.run(self.engine, self.addresses)


class FakeScheduler:
    def __init__(self, n: int) -> None:
        self.timesteps = torch.arange(n, 0, -1)

    def scale_model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return x

    def step(self, noise: torch.Tensor, t: Any, latents: torch.Tensor, return_dict: bool = False) -> Any:
        return (latents,)


def _run_plan(
    manifest: mf.Manifest, steps: int, params: TGateParams, cuda_graph: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Device, dict[str, TrtEngine], list[GraphVariant], list[Any]]:
    """The real sampler loop and engine runner over fake engines for every UNet variant of ``manifest``."""
    from tgate_trt.runtime.pipeline import _EngineRunner

    monkeypatch.setitem(sys.modules, "tensorrt", FAKE_TRT)
    device, shared = Device(), SharedActivations("cpu")
    monkeypatch.setattr(TrtEngine, "_capture", lambda self: FakeGraph(device, self))
    variants = [GraphVariant.from_dict(k, v) for k, v in manifest.variants.items()]
    engines = {}
    for i, v in enumerate(variants):
        fake = _fake_engine(manifest, v.key, 1000 * (i + 1))
        engines[v.key] = TrtEngine(v.key, manifest.graphs[v.key], fake, shared, FakeStream(), cuda_graph)  # type: ignore[arg-type]
        fake.ctx.on_run = lambda addresses, e=engines[v.key]: device.run(e, addresses)
        device.engines.append(engines[v.key])
    cond = {
        n: np.ones(shape[1], np.float32)
        for v in variants
        for n, shape in profiles_for(manifest, v.key, 1, 32, 32).items()
        if n in mf.conditioning_inputs(manifest.model, cfg=v.cfg, text=v.reads_text)
    }
    steps_plan = plan(steps, params, manifest.model.cfg)
    runner = _EngineRunner(engines, manifest.model, cond)  # type: ignore[arg-type]
    denoise(steps_plan, variants, manifest.sites, runner, runner.conditioning, FakeScheduler(steps),
            torch.zeros(1, 4, 4, 4))  # fmt: skip
    return device, engines, variants, steps_plan


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize(
    ("steps", "params"),
    [(25, TGateParams.v2()), (12, TGateParams(5, 2, 3, 1)), (8, TGateParams.v1(3))],
    ids=["v2-defaults", "v2-fi3", "v1-plan"],
)
def test_v2_handoffs_zero_copy_and_never_overwritten(
    v2_manifest: mf.Manifest, steps: int, params: TGateParams, cuda_graph: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replaying call reads, at the very addresses of its producer's output buffers (no copy), exactly
    what the capturing call the plan names wrote there: no later call overwrote it in between."""
    device, engines, variants, steps_plan = _run_plan(v2_manifest, steps, params, cuda_graph, monkeypatch)
    assert len(device.calls) == steps
    source: dict[str, int] = {}  # kind -> step whose capture the sampler holds
    producers: dict[tuple[str, str], set[str]] = {}
    for (name, tags, addresses), step in zip(device.calls, steps_plan, strict=True):
        variant = select(variants, step)
        assert name == variant.key
        for kind in sorted(variant.replay):
            i = source[kind]
            producer = engines[device.calls[i][0]]
            producers.setdefault((name, kind), set()).add(producer.name)
            for n in v2_manifest.sites[kind]:
                assert tags[n] == i, (step.index, name, n)  # the capture of step i, not overwritten
                assert addresses[n] == producer.outputs[n].data_ptr(), (step.index, name, n)  # zero-copy
        source.update({kind: step.index for kind, _ in step.capture})
    assert producers  # the plan replays something
    for e in engines.values():
        assert not set(e._staged) & {n for names in v2_manifest.sites.values() for n in names}
    if cuda_graph:
        assert device.replays > 0 and not any(e.context.runs == e.calls for e in engines.values() if e.calls > 2)
        if params.fi_interval == 3:  # unet_post_r12 reads self_NN from two producers: one graph each
            assert producers[("unet_post_r12", "attn1")] == {"unet_gate", "unet_post_r2_c1"}
            assert len(engines["unet_post_r12"]._graphs) == 2
    else:
        assert device.replays == 0


# --- real TensorRT + GPU ------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["v1", "v2"])
def test_build_and_run_tiny_engines_match_ort(
    schedule: str, tiny_export: Path, v2_export: Callable[[str], Path], tmp_path: Path
) -> None:
    """Real TensorRT on a GPU: a plan for every graph (each V2 variant), and the TRT pipeline (caches handed
    over by address, CUDA graphs) equals ONNX Runtime, each variant called as often as the plan says."""
    trt = _real_tensorrt()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch (a CUDA build of torch)")
    from tgate_trt.families import make_scheduler
    from tgate_trt.runtime.pipeline import TGatePipeline
    from tgate_trt.runtime.trt_engine import load_engines

    export = tiny_export if schedule == "v1" else v2_export("tiny")
    section = build_engines(export, tmp_path / "plans", BuildOptions(), 1, 64, 64)
    ref = TGatePipeline.from_export(export)
    assert section["tensorrt"] == trt.__version__ and set(section["plans"]) == set(ref.manifest.graphs)
    engines = load_engines(export, tmp_path / "plans", cuda_graphs=True)
    pipe = TGatePipeline(export, ref.manifest, dict(engines), ref.tokenizer)
    params = TGateParams.v1(4) if schedule == "v1" else TGateParams(5, 2, 3, 1)
    kwargs = {
        "num_inference_steps": 12,
        "gate_step": params.gate_step,
        "seed": 0,
        "scheduler": "ddim",
        "sp_interval": params.sp_interval,
        "fi_interval": params.fi_interval,
        "warm_up": params.warm_up,
    }
    a, b = ref("a red circle", **kwargs), pipe("a red circle", **kwargs)
    assert np.abs(a.latents - b.latents).max() < 1e-2
    steps = pipe.plan(12, params, make_scheduler(pipe.scheduler_config, "ddim"))
    for key in ref.manifest.variants:
        assert b.calls[key] == sum(select(pipe.variants, s).key == key for s in steps), key
