"""TensorRT build-path checks that run without TensorRT or a GPU: profiles, builder settings (what would be
handed to TensorRT), ONNX preparation and the missing-TensorRT errors. The runtime backend's checks are in
``test_trt_backend.py``."""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tgate_trt import manifest as mf
from tgate_trt.engines import build as build_mod
from tgate_trt.engines.build import TensorRTMissing, build_engines, import_tensorrt
from tgate_trt.engines.cli import main as build_main
from tgate_trt.engines.options import (
    BuilderSettings,
    BuildOptions,
    apply_settings,
    builder_settings,
    parse_range,
    save_timing_cache,
)
from tgate_trt.engines.profiles import all_profiles, concrete_shape, is_static, profiles_for


@pytest.fixture(scope="module")
def manifest(tiny_export: Path) -> mf.Manifest:
    return mf.Manifest.load(tiny_export)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


# --- profiles ----------------------------------------------------------------------------------------
def test_static_profiles_cover_every_input(manifest: mf.Manifest) -> None:
    profiles = all_profiles(manifest, batch=2, height=64, width=96)
    assert set(profiles) == set(manifest.graphs)
    for key, spec in manifest.graphs.items():
        assert set(profiles[key]) == {t.name for t in spec.inputs}
        assert is_static(profiles[key])
    lh, lw = 64 // 8, 96 // 8
    assert profiles[mf.TEXT_ENCODER]["input_ids"][1] == (
        4,
        manifest.text["max_length"],
    )  # prompts + negatives
    assert profiles[mf.PREGATE][mf.SAMPLE][1] == (2, 4, lh, lw)
    assert profiles[mf.PREGATE][mf.PROMPT_EMBEDS][1] == (2, 77, manifest.text["hidden_size"])
    assert profiles[mf.VAE_DECODER]["latent_sample"][1] == (2, 4, lh, lw)
    for layer in manifest.cache_layers:
        expected = (2, layer.tokens(lh, lw), layer.channels)
        assert profiles[mf.POSTGATE][layer.name][1] == expected
        # the pre-gate graph produces exactly what the post-gate profile expects
        out = manifest.graphs[mf.PREGATE].output(layer.name)
        assert concrete_shape(manifest, mf.PREGATE, out.shape, 2, 64, 96) == expected


def test_ranged_profiles(manifest: mf.Manifest) -> None:
    ranges = {"batch": (1, 4), "height": (32, 128), "width": (64, 96)}
    prof = profiles_for(manifest, mf.PREGATE, 2, 64, 80, ranges)
    assert prof[mf.SAMPLE] == ((1, 4, 4, 8), (2, 4, 8, 10), (4, 4, 16, 12))
    assert prof[mf.TIMESTEP] == ((1,), (1,), (1,))
    te = profiles_for(manifest, mf.TEXT_ENCODER, 2, 64, 80, ranges)
    assert te["input_ids"] == ((2, 77), (4, 77), (8, 77))
    post = profiles_for(manifest, mf.POSTGATE, 2, 64, 80, ranges)
    level2 = next(c for c in manifest.cache_layers if c.level == 2)
    assert post[level2.name] == ((1, 2 * 4, 64), (2, 4 * 5, 64), (4, 8 * 6, 64))
    assert not is_static(prof)


def test_profiles_match_what_ort_runs(manifest: mf.Manifest, tiny_export: Path) -> None:
    """Feeding each graph its opt shapes in ONNX Runtime gives the outputs the manifest predicts."""
    import onnxruntime as ort

    for key, spec in manifest.graphs.items():
        prof = profiles_for(manifest, key, 1, 32, 48)
        rng = np.random.default_rng(0)
        feeds = {
            t.name: (
                rng.integers(0, 10, prof[t.name][1])
                if "int" in t.dtype
                else rng.standard_normal(prof[t.name][1])
            ).astype(t.dtype)
            for t in spec.inputs
        }
        sess = ort.InferenceSession(str(tiny_export / spec.file), providers=["CPUExecutionProvider"])
        outs = sess.run([o.name for o in spec.outputs], feeds)
        for o, value in zip(spec.outputs, outs, strict=True):
            assert value.shape == concrete_shape(manifest, key, o.shape, 1, 32, 48), (key, o.name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 60}, "multiples of 16"),
        ({"width": 0}, "width must be an integer >= 1"),
        ({"batch": 0}, "batch must be an integer >= 1"),
        ({"ranges": {"height": (40, 128)}}, "multiples of 16"),
        ({"ranges": {"batch": (2, 4)}}, "outside its dynamic range"),
        ({"ranges": {"batch": (4, 1)}}, "min > max"),
        ({"ranges": {"steps": (1, 2)}}, "unknown: steps"),
        ({"graph_key": "unet"}, "no graph 'unet'"),
    ],
)
def test_bad_sizes_raise(manifest: mf.Manifest, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"graph_key": mf.PREGATE, "batch": 1, "height": 64, "width": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        profiles_for(manifest, **args)


def test_unknown_symbolic_dim_raises(manifest: mf.Manifest) -> None:
    spec = manifest.graphs[mf.PREGATE]
    odd = dataclasses.replace(spec, inputs=[mf.TensorSpec("sample", "float32", ["frames", 4, 8, 8])])
    m = dataclasses.replace(manifest, graphs={**manifest.graphs, mf.PREGATE: odd})
    with pytest.raises(ValueError, match="'frames'"):
        profiles_for(m, mf.PREGATE, 1, 64, 64)


# --- options -> builder settings -> TensorRT config ---------------------------------------------------
class _Names:
    """Stands in for a TensorRT enum: attribute X is the string 'Enum.X'."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __getattr__(self, name: str) -> str:
        return f"{self.kind}.{name}"


class FakeConfig:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.pools: dict[str, int] = {}
        self.hardware_compatibility_level: str | None = None
        self.builder_optimization_level: int | None = None
        self.timing_cache: Any = None

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def create_timing_cache(self, data: bytes) -> tuple[str, bytes]:
        return ("cache", bytes(data))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return types.SimpleNamespace(serialize=lambda: b"grown-cache")


class FakeBuilder:
    def __init__(self) -> None:
        self.network_flags: int | None = None

    def create_network(self, flags: int) -> str:
        self.network_flags = flags
        return "network"


FAKE_TRT = types.SimpleNamespace(
    BuilderFlag=_Names("BuilderFlag"),
    MemoryPoolType=_Names("MemoryPoolType"),
    HardwareCompatibilityLevel=_Names("HardwareCompatibilityLevel"),
    NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
)


def _configure(
    options: BuildOptions, manifest: mf.Manifest
) -> tuple[BuilderSettings, FakeConfig, FakeBuilder]:
    settings = builder_settings(options, manifest)
    config, builder = FakeConfig(), FakeBuilder()
    assert apply_settings(FAKE_TRT, builder, config, settings) == "network"
    return settings, config, builder


def test_defaults_hand_tensorrt_a_plain_config(manifest: mf.Manifest) -> None:
    settings, config, builder = _configure(BuildOptions(), manifest)
    assert config.flags == [] and config.pools == {} and builder.network_flags == 0
    assert config.hardware_compatibility_level == "HardwareCompatibilityLevel.NONE"
    assert config.builder_optimization_level == 3
    assert config.timing_cache is None and not settings.engine_host_code_allowed


def _fp16_manifest(manifest: mf.Manifest) -> mf.Manifest:
    return dataclasses.replace(manifest, dtype="fp16")


def test_option_fp16_on_fp32_export_sets_fp16_flag(manifest: mf.Manifest) -> None:
    settings, config, builder = _configure(BuildOptions(fp16=True), manifest)
    assert config.flags == ["BuilderFlag.FP16"] and builder.network_flags == 0


def test_option_strongly_typed_auto_for_fp16_export(manifest: mf.Manifest) -> None:
    for fp16 in (False, True):
        settings, config, builder = _configure(BuildOptions(fp16=fp16), _fp16_manifest(manifest))
        assert settings.network_flags == ("STRONGLY_TYPED",) and builder.network_flags == 1 << 1
        assert "BuilderFlag.FP16" not in config.flags  # strongly typed networks refuse precision flags


def test_option_strongly_typed_explicit(manifest: mf.Manifest) -> None:
    _, _, builder = _configure(BuildOptions(strongly_typed=True), manifest)
    assert builder.network_flags == 1 << 1
    settings, config, builder = _configure(
        BuildOptions(fp16=True, strongly_typed=False), _fp16_manifest(manifest)
    )
    assert builder.network_flags == 0 and config.flags == ["BuilderFlag.FP16"]
    with pytest.raises(ValueError, match="drop --strongly-typed"):
        builder_settings(BuildOptions(fp16=True, strongly_typed=True), manifest)


def test_option_timing_cache_loaded_and_saved(manifest: mf.Manifest, tmp_path: Path) -> None:
    path = tmp_path / "caches" / "trt.cache"
    settings, config, _ = _configure(BuildOptions(timing_cache=path), manifest)
    assert settings.timing_cache == str(path) and config.timing_cache == ("cache", b"")  # new cache
    save_timing_cache(config, settings)
    assert path.read_bytes() == b"grown-cache"
    _, config, _ = _configure(BuildOptions(timing_cache=path), manifest)
    assert config.timing_cache == ("cache", b"grown-cache")  # the next build starts from it


def test_option_optimization_level(manifest: mf.Manifest) -> None:
    _, config, _ = _configure(BuildOptions(optimization_level=5), manifest)
    assert config.builder_optimization_level == 5


def test_option_workspace(manifest: mf.Manifest) -> None:
    _, config, _ = _configure(BuildOptions(workspace_gib=1.5), manifest)
    assert config.pools == {"MemoryPoolType.WORKSPACE": 3 << 29}


def test_option_hardware_compat(manifest: mf.Manifest) -> None:
    _, config, _ = _configure(BuildOptions(hardware_compat="ampere+"), manifest)
    assert config.hardware_compatibility_level == "HardwareCompatibilityLevel.AMPERE_PLUS"


def test_option_version_compatible(manifest: mf.Manifest) -> None:
    settings, config, _ = _configure(BuildOptions(version_compatible=True), manifest)
    assert config.flags == ["BuilderFlag.VERSION_COMPATIBLE"] and settings.engine_host_code_allowed
    settings, config, _ = _configure(
        BuildOptions(version_compatible=True, exclude_lean_runtime=True), manifest
    )
    assert config.flags == ["BuilderFlag.VERSION_COMPATIBLE", "BuilderFlag.EXCLUDE_LEAN_RUNTIME"]


def test_option_strip_weights(manifest: mf.Manifest) -> None:
    settings, config, _ = _configure(BuildOptions(strip_weights=True), manifest)
    assert (
        config.flags == ["BuilderFlag.STRIP_PLAN", "BuilderFlag.REFIT_IDENTICAL"] and settings.refit_from_onnx
    )


def test_option_dynamic_reaches_the_profile(manifest: mf.Manifest) -> None:
    options = BuildOptions(dynamic={"batch": (1, 4)})
    profile = all_profiles(manifest, 2, 64, 64, options.dynamic)[mf.PREGATE]
    calls: list[tuple[Any, ...]] = []
    opt_profile = types.SimpleNamespace(set_shape=lambda *a: calls.append(a))
    builder = types.SimpleNamespace(create_optimization_profile=lambda: opt_profile)
    added: list[Any] = []
    config = types.SimpleNamespace(add_optimization_profile=added.append)
    inputs = [types.SimpleNamespace(name=n) for n in profile]
    network = types.SimpleNamespace(num_inputs=len(inputs), get_input=inputs.__getitem__)
    build_mod.add_profile(builder, config, network, profile, mf.PREGATE)
    assert added == [opt_profile] and ("sample", (1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)) in calls
    network = types.SimpleNamespace(num_inputs=1, get_input=lambda i: inputs[0])
    with pytest.raises(RuntimeError, match="differ from the manifest"):
        build_mod.add_profile(builder, config, network, profile, mf.PREGATE)


def test_every_option_is_tested() -> None:
    """Adding a BuildOptions field without a test_option_* here fails this test."""
    tested = {n.removeprefix("test_option_") for n in globals() if n.startswith("test_option_")}
    covered = {"fp16": "fp16_on_fp32_export_sets_fp16_flag", "strongly_typed": "strongly_typed_explicit",
               "timing_cache": "timing_cache_loaded_and_saved", "optimization_level": "optimization_level",
               "workspace_gib": "workspace", "hardware_compat": "hardware_compat",
               "version_compatible": "version_compatible", "exclude_lean_runtime": "version_compatible",
               "strip_weights": "strip_weights", "dynamic": "dynamic_reaches_the_profile"}  # fmt: skip
    assert {f.name for f in dataclasses.fields(BuildOptions)} == set(covered)
    assert set(covered.values()) <= tested


def test_setting_names_exist_in_tensorrt_stubs(manifest: mf.Manifest) -> None:
    """Every enum name handed to getattr(trt...) is a real TensorRT name (checked in tensorrt-stubs)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-stubs not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    text = (Path(next(iter(spec.submodule_search_locations))) / "tensorrt.pyi").read_text()

    def members(cls: str) -> set[str]:
        return set(re.findall(rf"    (\w+): typing.ClassVar\[{cls}\]", text))

    everything = BuildOptions(
        fp16=True, workspace_gib=1, hardware_compat="ampere+", version_compatible=True,
        exclude_lean_runtime=True, strip_weights=True,
    )  # fmt: skip
    s = builder_settings(everything, manifest)
    assert set(s.builder_flags) <= members("BuilderFlag")
    assert set(builder_settings(BuildOptions(strongly_typed=True), manifest).network_flags) <= members(
        "NetworkDefinitionCreationFlag"
    )
    assert set(s.memory_pool_limits) <= members("MemoryPoolType")
    assert s.hardware_compatibility_level in members("HardwareCompatibilityLevel")
    assert "USER_MANAGED" in members("ExecutionContextAllocationStrategy")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimization_level": 6}, "0..5"),
        ({"optimization_level": -1}, "0..5"),
        ({"optimization_level": True}, "0..5"),
        ({"workspace_gib": 0}, "positive number of GiB"),
        ({"hardware_compat": "turing"}, "none, ampere\\+"),
        ({"exclude_lean_runtime": True}, "add --version-compatible"),
        ({"dynamic": {"steps": (1, 2)}}, "batch, height, width"),
        ({"dynamic": {"batch": (4, 2)}}, "1 <= MIN <= MAX"),
        ({"dynamic": {"batch": (0, 2)}}, "1 <= MIN <= MAX"),
    ],
)
def test_option_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BuildOptions(**kwargs)


def test_parse_range() -> None:
    assert parse_range("height=256:768") == ("height", (256, 768))
    for bad in ("height", "height=256", "height=a:b", "=1:2x"):
        with pytest.raises(ValueError, match="NAME=MIN:MAX"):
            parse_range(bad)


def test_options_round_trip_as_json(tmp_path: Path) -> None:
    from tgate_trt.engines.options import options_from_mapping

    opts = BuildOptions(fp16=True, timing_cache=tmp_path / "c", dynamic={"batch": (1, 4)})
    assert options_from_mapping(opts.to_dict()) == opts


def test_prepare_onnx_keeps_the_graph(manifest: mf.Manifest, tiny_export: Path, tmp_path: Path) -> None:
    """The cleaned graph (external data, shape-inferred, folded where available) computes the same."""
    import onnxruntime as ort

    spec = manifest.graphs[mf.POSTGATE]
    for fold in (True, False):
        path, steps = build_mod.prepare_onnx(tiny_export / spec.file, tmp_path / f"fold{fold}", fold=fold)
        assert (path.parent / "model.onnx_data").is_file() and "onnx.shape_inference" in steps
        assert any("fold_constants" in s for s in steps) == fold
        prof = profiles_for(manifest, mf.POSTGATE, 1, 32, 32)
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal(p[1]).astype(np.float32) for n, p in prof.items()}
        runs = [
            ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in (tiny_export / spec.file, path)
        ]
        np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


# --- missing TensorRT ------------------------------------------------------------------------------
def test_import_tensorrt_missing(no_tensorrt: None) -> None:
    with pytest.raises(TensorRTMissing, match=r"pip install 'tgate-trt\[tensorrt\]'.*Jetson"):
        import_tensorrt()


def test_import_tensorrt_stubs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(TensorRTMissing, match="only type stubs"):
        import_tensorrt()


def test_build_engines_without_tensorrt_writes_nothing(
    tiny_export: Path, tmp_path: Path, no_tensorrt: None
) -> None:
    out = tmp_path / "plans"
    with pytest.raises(TensorRTMissing, match="tensorrt>=10.8"):
        build_engines(tiny_export, out, BuildOptions(), 1, 64, 64)
    assert not out.exists()
    with pytest.raises(ValueError, match="multiples of 16"):  # bad sizes are reported before TensorRT
        build_engines(tiny_export, out, BuildOptions(), 1, 60, 64)


def test_cli_without_tensorrt(tiny_export: Path, tmp_path: Path, no_tensorrt: None, capsys: Any) -> None:
    out = tmp_path / "plans"
    before = sorted(p.name for p in tiny_export.iterdir())
    assert build_main([str(tiny_export), "--out", str(out), "--fp16", "--dynamic", "batch=1:4"]) == 2
    err = capsys.readouterr().err
    assert "tgate-build: error:" in err and "pip install 'tgate-trt[tensorrt]'" in err
    assert not out.exists()
    assert build_main([str(tiny_export)]) == 2  # default --out (EXPORT_DIR/engines) is not created either
    assert sorted(p.name for p in tiny_export.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--opt-level", "9"], "0..5"), (["--dynamic", "batch=4"], "NAME=MIN:MAX"), (["--height", "60"], "16")],
)
def test_cli_bad_options(tiny_export: Path, tmp_path: Path, args: list[str], match: str, capsys: Any) -> None:
    assert build_main([str(tiny_export), "--out", str(tmp_path / "o"), *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_missing_export(tmp_path: Path, capsys: Any) -> None:
    assert build_main([str(tmp_path / "nope")]) == 2
    assert "run tgate-export first" in capsys.readouterr().err


def test_export_with_engines_refuses_before_exporting_without_tensorrt(tmp_path: Path, capsys) -> None:
    from tgate_trt.engines.build import TensorRTMissing, import_tensorrt
    from tgate_trt.engines.cli import export_main

    try:
        import_tensorrt()
        pytest.skip("TensorRT is installed: the missing-TensorRT path can't be shown here")
    except TensorRTMissing:
        pass
    out = tmp_path / "exp"
    assert export_main(["--model", "tiny", "--out", str(out), "--engines"]) == 2
    assert "pip install 'tgate-trt[tensorrt]'" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
