"""Build TensorRT plans for every graph of an export folder.

Every graph ``manifest.graphs`` lists gets a plan: the text encoder(s), each UNet variant of the export's
schedule (V1: ``unet_pregate``, ``unet_postgate``; V2: ``unet_c1``, ``unet_r1``, ``unet_gate``,
``unet_post_r2_c1``, ``unet_post_r12``) and the VAE decoder; no graph name is special here. Before TensorRT is
even imported, every profile is computed from the manifest and every cache hand-off between variants is
checked (:func:`.profiles.check_handoffs`: what a capturing variant outputs is exactly what each variant
replaying it accepts, at min, opt and max). The graphs of one build share one timing cache in memory (the
UNet variants have most layers in common, so later variants reuse the first one's tactic timings), saved to
``--timing-cache`` when given.

TensorRT is imported lazily: without it, ``build_engines`` raises ``TensorRTMissing`` (saying what to
install) before anything is written. Plans are written atomically as ``<out>/<graph>.plan``; the last
file written is ``<out>/engines.json``, the ``engines`` manifest section (each plan with its file, sha256,
profile, the shapes it outputs and, for a UNet variant, what it replays and captures), so its presence
means the build completed.

``gated_unet=True`` (``tgate-build --gated-unet``) builds one plan ``unet_gated`` for every UNet variant instead
(:mod:`.gated`, :mod:`.gated_onnx`): one copy of the UNet weights on the GPU, an ONNX ``If`` per cache site,
one optimization profile per CFG batch; the runtime serves each variant as a view of it. docs/tensorrt-weights.md
says why, and what only a GPU can confirm.

Not verifiable without TensorRT and a GPU (no such machine here): that TensorRT's parser takes every
variant's ONNX, that the plans build, and that their outputs match ONNX Runtime; the GPU test in
``tests/test_trt_backend.py`` does that where TensorRT is installed. Everything before the first TensorRT
call runs in the tests against a stand-in ``tensorrt`` module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import manifest as mf
from ..contract.errors import UsageError, UserError
from ..contract.files import atomic_write_json
from .gated import GATED_KEY, GatedSpec, gated_profiles, gated_spec, profile_settings
from .options import BuilderSettings, BuildOptions, apply_settings, builder_settings, save_timing_cache
from .profiles import Profile, all_profiles, check_handoffs, is_static, output_shapes

ENGINES_JSON = "engines.json"
SECTION_FORMAT = 1
TRT_RANGE = ((10, 8), (10, 14))  # the tensorrt extra's bounds; type-checked against the 10.13 stubs
INSTALL_HINT = (
    "pip install -e '.[tensorrt]' in a clone on the GPU host (tensorrt>=10.8,<10.14, with polygraphy and "
    "onnx-graphsurgeon); on Jetson use JetPack 7's TensorRT 10.13 (JetPack 6's TensorRT 10.3 is too old)"
)


class TensorRTMissing(UserError, RuntimeError):
    """The TensorRT builder (Python package ``tensorrt``) is not importable here."""


def import_tensorrt() -> ModuleType:
    """The real ``tensorrt`` module, or ``TensorRTMissing`` with the package to install.

    ``tensorrt-stubs`` installs a ``tensorrt/`` folder holding only ``.pyi`` files, which Python imports
    as an empty namespace package: that counts as missing too.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder"):
        raise TensorRTMissing(f"only TensorRT's type stubs are installed here, not TensorRT itself: {INSTALL_HINT}")
    found = tuple(int(p) for p in str(getattr(trt, "__version__", "0")).split(".")[:2] if p.isdigit())
    if not TRT_RANGE[0] <= found < TRT_RANGE[1]:
        raise TensorRTMissing(
            f"TensorRT {getattr(trt, '__version__', '?')} is outside the range this code is checked against "
            f"(10.8 to 10.13): {INSTALL_HINT}"
        )
    return trt


def gpu_info() -> dict[str, str | None]:
    """Name and compute capability of the current CUDA device, via torch (None when unknown)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a CPU-only torch or a broken driver: the section says "unknown"
        pass
    return {"name": None, "compute_capability": None}


def prepare_onnx(src: Path, work: Path, fold: bool = True) -> tuple[Path, list[str]]:
    """Clean a graph for TensorRT: graphsurgeon cleanup + toposort, Polygraphy constant folding, shapes.

    Always saved with external data and shape-inferred through the path API, so >2 GB UNets work.
    Folding is skipped for weight-stripped plans: refitting matches weights by initializer name, and
    folding would create weights that exist only in the folded copy instead of the shipped ONNX.
    """
    import onnx

    steps: list[str] = []
    model = onnx.load(str(src), load_external_data=True)
    try:
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        steps += ["graphsurgeon.cleanup", "graphsurgeon.toposort"]
    except ImportError:
        steps.append("skipped cleanup: onnx-graphsurgeon not installed")
    if fold:
        try:
            from polygraphy.backend.onnx import fold_constants

            model = fold_constants(model, error_ok=True)
            steps.append("polygraphy.fold_constants")
        except ImportError:
            steps.append("skipped fold_constants: polygraphy not installed")
    work.mkdir(parents=True, exist_ok=True)
    dst = work / "model.onnx"
    onnx.save_model(
        model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data"
    )
    del model
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst))
    steps.append("onnx.shape_inference")
    return dst, steps


def prepare_gated(src: Path, work: Path, spec: GatedSpec, fold: bool = True) -> tuple[Path, list[str]]:
    """The gated UNet (:mod:`.gated_onnx`) from the base variant's ONNX, cleaned as :func:`prepare_onnx`
    cleans every graph (before the ``If`` nodes exist: the cleaners see a plain graph)."""
    import onnx

    from .gated_onnx import count_ifs, gated_file

    base, steps = prepare_onnx(src, work / "base", fold=fold)
    dst = gated_file(base, work / "model.onnx", spec)
    shutil.rmtree(work / "base", ignore_errors=True)
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst))
    ifs = count_ifs(onnx.load(str(dst), load_external_data=False))
    return dst, [*steps, "gated: " + ", ".join(f"{n} If on replay.{k}" for k, n in sorted(ifs.items()))]


def add_profile(
    builder: Any, config: Any, network: Any, profile: Profile, key: str, extra_memory_target: float | None = None
) -> None:
    """One optimization profile; every network input must have a shape from the manifest. A later profile of
    the gated UNet gets ``extra_memory_target`` 0: TensorRT then aims to add no weight memory for it (a hint,
    not a guarantee: see docs/tensorrt-weights.md)."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise RuntimeError(
            f"{key}: the ONNX inputs {sorted(names)} differ from the manifest's {sorted(profile)}: re-export"
        )
    opt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        opt_profile.set_shape(name, mn, opt, mx)
    if extra_memory_target is not None:
        opt_profile.extra_memory_target = extra_memory_target
    config.add_optimization_profile(opt_profile)


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` via a temp file and rename; returns its sha256."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def _build_one(
    trt: Any,
    builder: Any,
    logger: Any,
    settings: BuilderSettings,
    onnx_path: Path,
    profiles: list[Profile],
    key: str,
    timing_cache: Any = None,
) -> tuple[bytes, Any]:
    """One plan (one profile each, two for a gated UNet of a CFG family); returns it with the timing cache to
    hand to the next graph of the build (the first graph creates it: from ``--timing-cache`` when given, else
    empty)."""
    config = builder.create_builder_config()
    network = apply_settings(trt, builder, config, settings)
    if timing_cache is None:
        timing_cache = config.get_timing_cache() if settings.timing_cache else config.create_timing_cache(b"")
    config.set_timing_cache(timing_cache, False)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {key} ({onnx_path}): {errors}")
    for i, profile in enumerate(profiles):
        add_profile(builder, config, network, profile, key, 0.0 if i else None)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build {key}: see the TensorRT log above")
    save_timing_cache(config, settings)
    return bytes(plan), timing_cache


def _shapes(profile: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in shapes] for name, shapes in profile.items()}


def _plan_record(
    manifest: mf.Manifest, key: str, profile: Profile, batch: int, height: int, width: int, options: BuildOptions
) -> dict[str, Any]:
    return {
        "profile": _shapes(profile),
        "outputs": _shapes(output_shapes(manifest, key, batch, height, width, options.dynamic)),
        "variant": manifest.variants.get(key),  # {cfg, replay, capture}; None for non-UNet graphs
    }


def _gated_record(manifest: mf.Manifest, spec: GatedSpec, profiles: list[Profile]) -> dict[str, Any]:
    """What the runtime needs to serve every variant from the gated plan: its contract, which profile runs
    which CFG setting, and the variants it serves (checked against the manifest at load)."""
    return {
        "profiles": [
            {"cfg": cfg, "shapes": _shapes(p)} for cfg, p in zip(profile_settings(manifest), profiles, strict=True)
        ],
        "gated": spec.to_dict(),
        "variants": dict(manifest.variants),
    }


def build_engines(
    export_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: BuildOptions,
    batch: int,
    height: int,
    width: int,
    graphs: tuple[str, ...] | None = None,
    gated_unet: bool = False,
) -> dict[str, Any]:
    """Build one plan per graph (default: every graph the manifest lists) and return the ``engines``
    section (also written to ``engines.json``). ``gated_unet``: one plan ``unet_gated`` for every UNet
    variant instead of one each (made from the variants' base graph when any variant is among ``graphs``).

    Everything that can be checked without TensorRT (manifest, sizes, options, cache hand-offs between the
    variants) is checked first, then TensorRT is imported; only then is ``out_dir`` created.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = mf.Manifest.load(export_dir, verify=True)
    if mf.QUANTIZATION in manifest.extra:
        raise UsageError(
            f"{export_dir} is an int8 copy for ONNX Runtime on CPUs (tgate-quantize): build engines from its "
            "fp32 or fp16 source export"
        )
    keys = graphs or tuple(manifest.graphs)
    unknown = [k for k in keys if k not in manifest.graphs]
    if unknown:
        raise UsageError(f"the export has no graph {', '.join(unknown)}; it has {', '.join(manifest.graphs)}")
    profiles: dict[str, list[Profile]] = {
        k: [p] for k, p in all_profiles(manifest, batch, height, width, options.dynamic, keys).items()
    }
    check_handoffs(manifest, batch, height, width, options.dynamic, keys)
    spec = gated_spec(manifest) if gated_unet and any(k in manifest.variants for k in keys) else None
    if spec is not None:
        keys = (*(k for k in keys if k not in manifest.variants), GATED_KEY)
        profiles[GATED_KEY] = gated_profiles(manifest, spec, batch, height, width, options.dynamic)
    settings = builder_settings(options, manifest)
    trt = import_tensorrt()
    gpu = gpu_info()
    cc = gpu["compute_capability"]
    if options.hardware_compat == "ampere+" and cc is not None and float(cc) < 8.0:
        raise UsageError(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; this is {gpu['name']} ({cc})"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tgate-build-", dir=out_dir))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    plans: dict[str, Any] = {}
    timing_cache: Any = None
    try:
        for key in keys:
            fold = not options.strip_weights
            if key == GATED_KEY and spec is not None:
                onnx_path, steps = prepare_gated(export_dir / manifest.graphs[spec.base].file, work / key, spec, fold)
            else:
                onnx_path, steps = prepare_onnx(export_dir / manifest.graphs[key].file, work / key, fold=fold)
            data, timing_cache = _build_one(trt, builder, logger, settings, onnx_path, profiles[key], key, timing_cache)
            digest = write_atomic(out_dir / f"{key}.plan", data)
            # refit source for weight-stripped plans (relative to the export): the gated graph's weights keep the
            # base variant's names, so it is refitted from that graph, the one copy on disk
            source = manifest.graphs[spec.base if key == GATED_KEY and spec is not None else key].file
            plans[key] = {"file": f"{key}.plan", "sha256": digest, "bytes": len(data), "onnx": source}
            plans[key]["onnx_steps"] = steps
            if key == GATED_KEY and spec is not None:
                plans[key].update(_gated_record(manifest, spec, profiles[key]))
            else:
                plans[key].update(_plan_record(manifest, key, profiles[key][0], batch, height, width, options))
            shutil.rmtree(work / key, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = {
        "format": SECTION_FORMAT,
        "tensorrt": str(trt.__version__),
        "gpu": gpu,
        "options": options.to_dict(),
        "settings": settings.to_dict(),
        "shape": {"batch": batch, "height": height, "width": width},
        "schedule": manifest.schedule,
        "static": all(is_static(p) for ps in profiles.values() for p in ps),
        "unet_layout": "variants" if spec is None else "gated",
        "plans": plans,
    }
    atomic_write_json(out_dir / ENGINES_JSON, section)
    return section
