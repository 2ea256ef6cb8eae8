"""One copy of the UNet weights on the GPU (docs/tensorrt-weights.md): the gated UNet graph, its views, its build
and its runtime. What needs no TensorRT runs here for real: the gated graph in ONNX Runtime against every variant
graph, the weights it holds, its profiles, the build against a stand-in ``tensorrt``, and the runtime's views
driving the real pipeline through a stand-in engine that runs the gated graph in ONNX Runtime at the very
addresses the views bind. The real build and run skip with the reason where TensorRT or a CUDA GPU is absent."""

from __future__ import annotations

import ctypes
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engines import _FakeTrtBuilder, fake_tensorrt  # noqa: F401 (a fixture, used through stand_in_tensorrt)
from test_trt_backend import FakeStream

from tgate_trt import manifest as mf
from tgate_trt.engines.build import TensorRTMissing, build_engines, import_tensorrt
from tgate_trt.engines.gated import (
    GATED_KEY,
    OUT,
    SAMPLE_IN,
    GatedSpec,
    N,
    NumpyOps,
    base_variant,
    gated_feeds,
    gated_profiles,
    gated_spec,
    input_recipe,
    kept_outputs,
    output_recipe,
    resolve,
    variant_outputs,
)
from tgate_trt.engines.gated_onnx import GatedGraphError, count_ifs, gated_file, make_gated
from tgate_trt.engines.options import BuildOptions
from tgate_trt.methods.plan import KINDS, TGateParams
from tgate_trt.methods.variants import CACHE_PREFIX, GraphVariant, source_of
from tgate_trt.runtime.trt_engine import PlanMismatch, SharedActivations, check_section

CASES = {"v1": ("tiny", "v1"), "v2": ("tiny", "v2"), "v2-sdxl": ("tiny-sdxl", "v2"), "v2-lcm": ("tiny-lcm", "v2")}
TOL = 1e-5


@pytest.fixture(scope="module")
def export(tiny_export: Path, v2_export: Callable[[str], Path]) -> Callable[[str], tuple[Path, mf.Manifest]]:
    def get(case: str) -> tuple[Path, mf.Manifest]:
        name, schedule = CASES[case]
        folder = tiny_export if schedule == "v1" else v2_export(name)
        return folder, mf.Manifest.load(folder)

    return get


@pytest.fixture(scope="module")
def gated(export: Callable[[str], tuple[Path, mf.Manifest]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``case -> (export folder, manifest, spec, gated ONNX path)``, each made once."""
    made: dict[str, tuple[Path, mf.Manifest, GatedSpec, Path]] = {}

    def get(case: str) -> tuple[Path, mf.Manifest, GatedSpec, Path]:
        if case not in made:
            folder, manifest = export(case)
            spec = gated_spec(manifest)
            dst = gated_file(folder / manifest.graphs[spec.base].file, tmp_path_factory.mktemp(case) / "g.onnx", spec)
            made[case] = (folder, manifest, spec, dst)
        return made[case]

    return get


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(manifest: mf.Manifest, key: str, seed: int, b: int = 2, lat: tuple[int, int] = (16, 8)) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in manifest.graphs[key].inputs:
        if t.name.startswith(tuple(CACHE_PREFIX.values())):
            continue
        shape = [
            b if d == mf.BATCH else lat[0] if d == mf.LATENT_H else lat[1] if d == mf.LATENT_W else d for d in t.shape
        ]
        out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    out[mf.TIMESTEP] = np.array([500.0 + seed], np.float32)
    if mf.GUIDANCE_SCALE in out:
        out[mf.GUIDANCE_SCALE] = np.array([7.5], np.float32)
    return out


# --- the gated graph in ONNX Runtime ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_gated_graph_equals_every_variant_in_ort(case: str, gated: Any) -> None:
    """For each variant's selector settings and input mapping, the one gated graph gives that variant graph's
    outputs (noise and captures) within 1e-5, replayed caches taken from another call of their source variant."""
    folder, manifest, spec, path = gated(case)
    g = _session(path)
    sessions = {k: _session(folder / manifest.graphs[k].file) for k in manifest.variants}
    variants = [GraphVariant.from_dict(k, v) for k, v in manifest.variants.items()]

    def run(v: GraphVariant, seed: int, extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        feeds = {**_feeds(manifest, v.key, seed), **extra}
        names = [o.name for o in manifest.graphs[v.key].outputs]
        return feeds, dict(zip(names, sessions[v.key].run(names, feeds), strict=True))

    for v in variants:
        caches: dict[str, Any] = {}
        for kind in KINDS:
            if kind in v.replay:  # the capture of another step (other latents, other timestep)
                src = source_of(variants, v, kind)
                caches.update({n: x for n, x in run(src, 7, {})[1].items() if n.startswith(CACHE_PREFIX[kind])})
        feeds, ref = run(v, 0, caches)
        gfeeds = gated_feeds(spec, manifest.model, v, feeds, NumpyOps())
        got = variant_outputs(
            spec, v, dict(zip([o.name for o in g.get_outputs()], g.run(None, gfeeds), strict=True)), feeds, NumpyOps()
        )
        assert set(got) == set(ref)
        for name in ref:
            assert got[name].shape == ref[name].shape and np.abs(got[name] - ref[name]).max() <= TOL, (v.key, name)
        if v.replay:  # the selector decides: computing instead of replaying gives another result
            computed = {**gfeeds, **{n: np.array(False) for n in gfeeds if n.startswith("replay.")}}
            assert np.abs(g.run([OUT], computed)[0] - g.run([OUT], gfeeds)[0]).max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_gated_graph_holds_each_weight_once_and_attention_in_branches(case: str, gated: Any) -> None:
    """The gated graph's weights are the base graph's, each once, all in the outer graph; every site is one
    If, and no attention computation (projections, softmax) is left outside an If branch, so a replayed
    site computes nothing."""
    import onnx

    folder, manifest, spec, path = gated(case)
    model = onnx.load(str(path), load_external_data=False)
    base = onnx.load(str(folder / manifest.graphs[spec.base].file), load_external_data=False)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and set(names) <= {i.name for i in base.graph.initializer}

    def size(t: Any) -> int:
        ext = {e.key: e.value for e in t.external_data}
        return int(ext.get("length", 0)) or len(t.raw_data)

    assert sum(map(size, model.graph.initializer)) <= sum(map(size, base.graph.initializer))
    assert count_ifs(model) == {k: len(ns) for k, ns in spec.sites.items()}
    for node in model.graph.node:
        for attr in node.attribute:
            assert not attr.g.initializer, "weights only in the outer graph"
    heavy = {"MatMul", "Softmax", "LayerNormalization", "Gemm"}
    outside = [n.name for n in model.graph.node if n.op_type in heavy and any(f"/{k}/" in n.name for k in spec.sites)]
    assert outside == []


def test_gated_spec_profiles_and_recipes(export: Callable[[str], tuple[Path, mf.Manifest]]) -> None:
    _, manifest = export("v1")
    spec = gated_spec(manifest)
    assert spec.base == mf.PREGATE and spec.cfg and spec.layouts == {"attn2": "mean"}
    cfg_p, post_p = gated_profiles(manifest, spec, 2, 64, 48)
    lh, lw = 8, 6
    assert cfg_p[SAMPLE_IN][1] == (4, 4, lh, lw) and post_p[SAMPLE_IN][1] == (2, 4, lh, lw)
    assert cfg_p["unet.encoder_hidden_states"][1] == (4, 77, manifest.text["hidden_size"])
    layer = manifest.cache_layers[1]
    assert post_p[layer.name][1] == (2, layer.tokens(lh, lw), layer.channels) and post_p["replay.attn2"][1] == ()
    ranged = gated_profiles(manifest, spec, 2, 64, 48, {"batch": (1, 3)})
    assert [p[SAMPLE_IN][0][0] for p in ranged] == [2, 1] and [p[SAMPLE_IN][2][0] for p in ranged] == [6, 3]
    pre, post = (GraphVariant.from_dict(k, v) for k, v in manifest.variants.items())
    assert input_recipe(spec, manifest.model, pre)[SAMPLE_IN] == ("cat", mf.SAMPLE, mf.SAMPLE)
    assert input_recipe(spec, manifest.model, post)["unet.encoder_hidden_states"] == ("zeros",)
    assert input_recipe(spec, manifest.model, post)["replay.attn2"] == ("flag", "1")
    assert output_recipe(spec, pre)[layer.name] == ("mean", f"{layer.name}.out")
    assert kept_outputs(spec, pre) == set() and kept_outputs(spec, post) == {OUT}
    assert resolve([N, "hw_x2", 5], 3, 8, 6) == (3, 12, 5)
    assert GatedSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_guidance_free_family_has_one_profile(export: Callable[[str], tuple[Path, mf.Manifest]]) -> None:
    _, manifest = export("v2-lcm")
    spec = gated_spec(manifest)
    assert not spec.cfg and mf.GUIDANCE_SCALE in {t.name for t in spec.inputs}
    (profile,) = gated_profiles(manifest, spec, 2, 64, 64)
    assert profile[SAMPLE_IN][1][0] == 2


def test_gating_refuses_other_structures(export: Callable[[str], tuple[Path, mf.Manifest]]) -> None:
    import onnx

    folder, manifest = export("v1")
    spec = gated_spec(manifest)
    model = onnx.load(str(folder / manifest.graphs[spec.base].file))
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and list(n.input) == [mf.SAMPLE, mf.SAMPLE])
    concat.input[1] = mf.SAMPLE + "_other"
    with pytest.raises(GatedGraphError, match=r"no Concat\(\[sample, sample\]\)"):
        make_gated(model, spec)
    only_post = mf.Manifest.from_dict({**manifest.to_dict(), "variants": {mf.POSTGATE: manifest.variants[mf.POSTGATE]}})
    with pytest.raises(ValueError, match="none that computes and captures every cache site"):
        base_variant(only_post)


# --- the build, against a stand-in tensorrt --------------------------------------------------------------
def _record_profiles(self: Any, network: Any, config: Any) -> bytes:
    """The plan a stand-in builder writes: every profile's shapes and its ``extra_memory_target``."""
    return json.dumps([[p.shapes, getattr(p, "extra_memory_target", None)] for p in config.profiles]).encode()


@pytest.fixture
def stand_in_tensorrt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """test_engines' stand-in ``tensorrt`` (its parser reads the prepared ONNX's real inputs), building plans
    of several profiles; returns the builders made."""
    monkeypatch.setattr(_FakeTrtBuilder, "build_serialized_network", _record_profiles)
    made: list[Any] = request.getfixturevalue("fake_tensorrt")
    return made


@pytest.mark.parametrize("case", ["v1", "v2", "v2-lcm"])
def test_build_makes_one_unet_plan_with_a_profile_per_cfg_batch(
    case: str, export: Callable[[str], tuple[Path, mf.Manifest]], tmp_path: Path, stand_in_tensorrt: list[Any]
) -> None:
    """``gated_unet``: the text encoder(s) and VAE as before, one ``unet_gated`` plan instead of the variants'
    plans, parsed from the gated ONNX (whose inputs must be its profiles'), a profile per CFG batch (the later
    one asked to add no weight memory), recorded so the runtime can serve and check every variant."""
    folder, manifest = export(case)
    section = build_engines(folder, tmp_path / "plans", BuildOptions(), 2, 64, 48, gated_unet=True)
    others = [k for k in manifest.graphs if k not in manifest.variants]
    assert list(section["plans"]) == [*others, GATED_KEY] and section["unet_layout"] == "gated"
    plan = section["plans"][GATED_KEY]
    spec = gated_spec(manifest)
    profiles = gated_profiles(manifest, spec, 2, 64, 48)
    built = json.loads((tmp_path / "plans" / plan["file"]).read_bytes())
    assert [p["shapes"] for p in plan["profiles"]] == [s for s, _ in built]
    assert [p["cfg"] for p in plan["profiles"]] == ([True, False] if manifest.model.cfg else [False])
    assert [t for _, t in built] == [None, 0.0][: len(profiles)]
    assert plan["onnx"] == manifest.graphs[spec.base].file and plan["variants"] == manifest.variants
    assert any(s.startswith("gated: ") for s in plan["onnx_steps"])
    check_section(section, manifest)
    (builder,) = stand_in_tensorrt
    assert len(builder.configs) == len(others) + 1


def test_check_section_with_a_gated_plan(export: Callable[[str], tuple[Path, mf.Manifest]]) -> None:
    _, manifest = export("v2")
    plans: dict[str, Any] = {k: {"file": f"{k}.plan"} for k in manifest.graphs if k not in manifest.variants}
    plans[GATED_KEY] = {"file": "unet_gated.plan", "variants": dict(manifest.variants)}
    check_section({"plans": plans}, manifest)
    fewer = {**plans, GATED_KEY: {"variants": {k: v for k, v in manifest.variants.items() if k != "unet_r1"}}}
    with pytest.raises(PlanMismatch, match="no plan for unet_r1"):
        check_section({"plans": fewer}, manifest)
    other = dict(manifest.variants, unet_r1=manifest.variants["unet_c1"])
    with pytest.raises(PlanMismatch, match="unet_r1: the plan was built for variant"):
        check_section({"plans": {**plans, GATED_KEY: {"variants": other}}}, manifest)


# --- the runtime's views, through the real pipeline, on a stand-in engine running ONNX Runtime -----------------
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bool": "BOOL", "int64": "INT64", "int32": "INT32"}
FAKE_TRT = types.SimpleNamespace(
    ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
    TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
    TensorLocation=types.SimpleNamespace(HOST="HOST", DEVICE="DEVICE"),
)


def _at(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array at a bound address (CPU tensors stand in for device memory)."""
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class _OrtContext:
    """A context whose "GPU" runs the gated graph in ONNX Runtime on the arrays at the bound addresses; input
    shapes must be the active profile's (a view on the wrong profile fails)."""

    def __init__(self, engine: _OrtEngine) -> None:
        self.engine, self.profile, self.runs = engine, 0, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return tuple(shape) == self.engine.profiles[self.profile][name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        b, _, h, w = self.shapes[SAMPLE_IN]
        return resolve(self.engine.outputs[name].shape, b, h, w)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        e = self.engine
        feeds = {n: _at(self.addresses[n], self.shapes[n], e.dtype[n]).copy() for n in e.inputs}
        for name, value in zip(e.outputs, e.session.run(list(e.outputs), feeds), strict=True):
            _at(self.addresses[name], value.shape, value.dtype)[...] = value
        self.runs += 1
        e.runs.append((self, dict(self.addresses)))
        return True


class _OrtEngine:
    """Stands in for the deserialized ``unet_gated`` plan (the TensorRT calls the runtime makes, no more)."""

    def __init__(self, path: Path, spec: GatedSpec, profiles: list[Any]) -> None:
        self.session, self.profiles = _session(path), profiles
        self.inputs = {t.name: t for t in spec.inputs}
        self.outputs = {t.name: t for t in spec.outputs}
        self.names = [*self.inputs, *self.outputs]
        self.dtype = {t.name: np.dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(profiles)
        self.device_memory_size_v2 = 4096
        self.contexts: list[_OrtContext] = []
        self.runs: list[tuple[_OrtContext, dict[str, int]]] = []

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name=TRT_DTYPES[self.dtype[name].name])

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def create_execution_context(self, strategy: str) -> _OrtContext:
        assert strategy == "USER_MANAGED"
        self.contexts.append(_OrtContext(self))
        return self.contexts[-1]


RUNS = {
    "v1": TGateParams.v1(3),
    "v2": TGateParams(5, 2, 3, 1),
    "v2-sdxl": TGateParams(5, 3, 2, 1),
    "v2-lcm": TGateParams(2, 1, 2, 0),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_views_run_the_pipeline_like_ort(case: str, gated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT runtime's views (feeds, profiles, selectors, scratch and kept buffers, zero-copy caches)
    driving the real pipeline give ONNX Runtime's per-variant result, each variant called as often, every
    view on the one engine with its own context, and each replayed cache read at its capture's address."""
    from tgate_trt.engines.gated import profile_settings
    from tgate_trt.engines.gated_views import gated_views
    from tgate_trt.runtime.pipeline import TGatePipeline

    folder, manifest, spec, path = gated(case)
    monkeypatch.setitem(sys.modules, "tensorrt", FAKE_TRT)
    ref = TGatePipeline.from_export(folder, providers=["CPUExecutionProvider"], cache_dir="")  # own weights
    h, w = manifest.defaults["height"], manifest.defaults["width"]
    engine = _OrtEngine(path, spec, gated_profiles(manifest, spec, 1, h, w))
    plan = {"gated": spec.to_dict(), "profiles": [{"cfg": c} for c in profile_settings(manifest)]}
    views = gated_views(manifest, plan, engine, SharedActivations("cpu"), FakeStream())  # type: ignore[arg-type]
    engines = {**{k: e for k, e in ref.engines.items() if k not in manifest.variants}, **views}
    pipe = TGatePipeline(folder, manifest, engines, ref.tokenizer)  # type: ignore[arg-type]
    p = RUNS[case]
    kwargs = {"num_inference_steps": 8, "gate_step": p.gate_step, "seed": 0, "scheduler": "ddim",
              "sp_interval": p.sp_interval, "fi_interval": p.fi_interval, "warm_up": p.warm_up}  # fmt: skip
    a, b = ref("a red circle", **kwargs), pipe("a red circle", **kwargs)
    assert np.abs(a.latents - b.latents).max() <= TOL
    assert {k: b.calls[k] for k in manifest.variants} == {k: a.calls[k] for k in manifest.variants}
    assert len(engine.contexts) == len(manifest.variants) and sum(c.runs for c in engine.contexts) == 8
    owned = {t.data_ptr(): n for v in views.values() for n, t in v.inner.outputs.items() if n in v.inner.keep}
    zero_copy = 0
    for _, addresses in engine.runs:  # a whole-batch cache is read where its capturing view wrote it: no copy
        for name in (n for ns in spec.sites.values() for n in ns if addresses[n] in owned):
            assert owned[addresses[name]] == f"{name}.out"
            zero_copy += 1
    assert (zero_copy > 0) == (case != "v1")  # V1 replays CFG means, computed after the call


# --- real TensorRT + GPU ------------------------------------------------------------------------------------
def _real_tensorrt() -> Any:
    try:
        trt = import_tensorrt()
    except TensorRTMissing as exc:
        pytest.skip(f"needs the TensorRT builder: {exc}")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch (a CUDA build of torch)")
    return trt


def _weight_bytes(trt: Any, plan: Path) -> int:
    """Device memory a deserialized plan holds (its weights and kernels), before any context."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    data = plan.read_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.mem_get_info()[0]
    engine = runtime.deserialize_cuda_engine(data)
    torch.cuda.synchronize()
    used = before - torch.cuda.mem_get_info()[0]
    del engine
    return used


@pytest.mark.parametrize("case", ["v1", "v2"])
def test_gated_engine_on_a_gpu(case: str, export: Callable[[str], tuple[Path, mf.Manifest]], tmp_path: Path) -> None:
    """Real TensorRT on a GPU: the gated plan builds (IIfConditional per site, a profile per CFG batch), its
    views give ONNX Runtime's result, and it holds less device memory than the variants' plans together."""
    trt = _real_tensorrt()
    from tgate_trt.runtime.pipeline import TGatePipeline
    from tgate_trt.runtime.trt_engine import load_engines

    folder, manifest = export(case)
    section = build_engines(folder, tmp_path / "gated", BuildOptions(), 1, 64, 64, gated_unet=True)
    per = build_engines(folder, tmp_path / "per", BuildOptions(), 1, 64, 64, graphs=tuple(manifest.variants))
    gated_bytes = _weight_bytes(trt, tmp_path / "gated" / section["plans"][GATED_KEY]["file"])
    per_bytes = [_weight_bytes(trt, tmp_path / "per" / p["file"]) for p in per["plans"].values()]
    assert gated_bytes < sum(per_bytes), (gated_bytes, per_bytes)
    ref = TGatePipeline.from_export(folder)
    pipe = TGatePipeline(folder, ref.manifest, dict(load_engines(folder, tmp_path / "gated")), ref.tokenizer)  # type: ignore[arg-type]
    p = RUNS[case]
    kwargs = {"num_inference_steps": 8, "gate_step": p.gate_step, "seed": 0, "scheduler": "ddim",
              "sp_interval": p.sp_interval, "fi_interval": p.fi_interval, "warm_up": p.warm_up}  # fmt: skip
    assert np.abs(ref("a red circle", **kwargs).latents - pipe("a red circle", **kwargs).latents).max() < 1e-2


def test_cli_gated_unet(
    export: Callable[[str], tuple[Path, mf.Manifest]], tmp_path: Path, stand_in_tensorrt: list[Any], capsys: Any
) -> None:
    """``tgate-build EXPORT --gated-unet``: the plans the build function makes, and what it prints."""
    from tgate_trt.engines.cli import main as build_main

    folder, manifest = export("v1")
    assert build_main([str(folder), "--out", str(tmp_path / "plans"), "--gated-unet"]) == 0
    section = json.loads((tmp_path / "plans" / "engines.json").read_text())
    assert section["unet_layout"] == "gated" and GATED_KEY in section["plans"]
    assert GATED_KEY in capsys.readouterr().out
