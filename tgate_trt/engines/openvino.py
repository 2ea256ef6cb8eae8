"""OpenVINO target: every graph of an export as OpenVINO IR, checked against ONNX Runtime fp32 at build time.

OpenVINO reads the export's ONNX directly, so the build is a conversion (``read_model``, MatMul weights stored
transposed, optional NNCF int8 weight compression, ``save_model`` with full-precision weights) followed by a
compile-and-compare of every graph on the target device at its inference precision. Every weight is written
once, into ``weights.bin``, however many graphs use it (the UNet variants share nearly all of theirs): each
graph's IR keeps its structure and small constants and takes its weights from that file
(:mod:`.openvino_shared`); ``shared_weights=False`` writes the earlier layout, one self-contained IR per
graph. Precision on a CPU is a compile property (``INFERENCE_PRECISION_HINT``), not a property of the IR, so
the IR is the same for bf16 and f32 and the runtime applies the precision recorded here. The folder is staged
and renamed into place, and only then is the section added to ``manifest.json``, so a failed build or a graph
out of tolerance writes nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .. import manifest as mf
from ..contract.errors import UserError
from ..contract.files import OutputDir, writer_lock
from ..contract.quiet import ort_log_level
from ..export.onnx_io import relative_error
from ..methods.variants import GraphVariant, source_of
from .openvino_shared import (
    WEIGHTS_FILE,
    WeightWriter,
    externalize_weights,
    map_weights,
    read_bound,
    transpose_matmul_weights,
)

OV_DIR = "openvino"
TARGET = "openvino"
SECTION_FORMAT = 2  # 2: weights.bin shared by the graphs (section "weights"); 1: one IR per graph
PRECISIONS = ("bf16", "f16", "f32", "int8w")
DEVICES = ("CPU", "GPU")
INSTALL_HINT = "pip install -e '.[openvino]' (openvino 2026.4.1 and nncf 3.4.0)"
VALIDATION_PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle on the left"]
# Largest relative L2 error of any output against ORT fp32 on seeded inputs, by precision. Measured worst
# (pre-gate noise prediction, where CFG at 7.5 amplifies the difference): f32 1e-5; bf16 0.076 (tiny), 0.068
# (SD-1.5), 0.017 (shapes); int8 weights 0.118 (tiny), 0.091 (SD-1.5). The limits leave ~2x room for other
# models; a broken conversion (wrong op, overflow) lands near 1. Image quality is judged on shapes instead.
TOLERANCES = {"f32": 1e-3, "f16": 0.15, "bf16": 0.15, "int8w": 0.25}
# Graphs kept in f32 whatever the precision, and why (measured; benchmarks/README.md, "OpenVINO").
_TEXT_F32 = (
    "runs once per image: bf16 saves ~50 ms of ~9 s on SD-1.5 at 256x256 (117 -> 67 ms a call) but moves the "
    "text states, which every denoising step reads, by 7e-3 (relative L2)"
)
KEEP_F32: dict[str, str] = {mf.TEXT_ENCODER: _TEXT_F32, mf.TEXT_ENCODER_2: _TEXT_F32}


class OpenVINOMissing(UserError, RuntimeError):
    """The ``openvino`` package (or NNCF for int8w) is not importable here."""


class OpenVINOBuildError(UserError, RuntimeError):
    """A build that can't start or whose graphs failed validation; the message says what to change."""


def import_openvino() -> ModuleType:
    try:
        import openvino as ov
    except ImportError as exc:
        raise OpenVINOMissing(f"OpenVINO is not installed ({exc}): {INSTALL_HINT}") from exc
    return ov


def supports_bf16(core: Any, device: str = "CPU") -> bool:
    """Whether the device has native bf16 (AMX or AVX-512 BF16 on a CPU), as its plugin reports it."""
    return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")


def default_precision(core: Any, device: str) -> tuple[str, str]:
    """bf16 on CPUs that have it, f32 on the others; f16 on Intel GPUs. Returns (precision, why)."""
    if device == "GPU":
        return "f16", "Intel GPUs run f16 natively"
    if supports_bf16(core, device):
        return "bf16", "this CPU has native bf16"
    return "f32", "this CPU has no native bf16 (no AMX or AVX-512 BF16), so f32"


def inference_precision(precision: str, device: str, core: Any | None = None) -> str:
    """The compile-time precision hint a build precision means (int8w: weights int8, math as the device's)."""
    if precision != "int8w":
        return precision
    if device == "GPU":
        return "f16"
    return "bf16" if core is not None and supports_bf16(core, device) else "f32"


def graph_precisions(keys: list[str], precision: str, device: str, core: Any) -> dict[str, dict[str, Any]]:
    """Per graph: weights stored (f32/int8), inference precision, and why a graph stays f32."""
    math = inference_precision(precision, device, core)
    out = {}
    for key in keys:
        keep = key in KEEP_F32 and math != "f32"
        out[key] = {
            "weights": "int8" if precision == "int8w" and not keep else "f32",
            "inference": "f32" if keep else math,
            "note": KEEP_F32[key] if keep else "",
        }
    return out


def compile_config(inference: str, device: str, threads: int = 0) -> dict[str, str]:
    """Latency settings for one request at a time: one stream, every CPU the process may use.

    The thread count is set from the process's CPU affinity unless given, rather than left to the LATENCY
    hint's own topology rules, which leave hyper-threads out (``ENABLE_HYPER_THREADING`` is off under it).
    """
    config = {"INFERENCE_PRECISION_HINT": inference, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if device == "CPU":
        config["INFERENCE_NUM_THREADS"] = str(threads or len(os.sched_getaffinity(0)))
    return config


def check_request(export_dir: Path, name: str, precision: str | None, device: str) -> tuple[mf.Manifest, str, str, Any]:
    """Everything refused before any conversion: the export's manifest, target folder, device, precision;
    then the hashes of the export's files."""
    manifest = mf.Manifest.load(export_dir, verify=False)
    if mf.QUANTIZATION in manifest.extra:
        raise OpenVINOBuildError(
            f"{export_dir} is an int8 copy for ONNX Runtime (tgate-quantize): build from its fp32 source export "
            "(use --precision int8w for int8 weights on OpenVINO)"
        )
    if manifest.dtype != "fp32":
        raise OpenVINOBuildError(
            f"{export_dir} is a {manifest.dtype} export; OpenVINO builds start from fp32 (re-export with --dtype fp32)"
        )
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or name in _export_parts(manifest) | {"engines"} | set(manifest.graphs)  # a graph key named a folder once
    ):
        raise OpenVINOBuildError(f"--out must name a folder of its own directly inside the export, got {name!r}")
    target, owned = export_dir / name, manifest.extra.get("engines", {}).get(name, {}).get("target") == TARGET
    if target.exists() and not target.is_dir():
        raise OpenVINOBuildError(f"{target} exists and is not a folder: pick another --out")
    if target.exists() and any(target.iterdir()) and not owned:
        raise OpenVINOBuildError(f"{target} exists and is not an OpenVINO build of this export: pick another --out")
    OutputDir(target, force=True).check()  # writable, and no other build writing it
    if device not in DEVICES:
        raise OpenVINOBuildError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    ov = import_openvino()
    core = ov.Core()
    if device not in {d.split(".")[0] for d in core.available_devices}:
        raise OpenVINOBuildError(
            f"OpenVINO sees no {device} here (it has {', '.join(core.available_devices)}): build on the machine "
            "that will run the engines, or pass --device CPU"
        )
    why = ""
    if precision is None:
        precision, why = default_precision(core, device)
    if precision not in PRECISIONS:
        raise OpenVINOBuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and (device != "CPU" or not supports_bf16(core, device)):
        raise OpenVINOBuildError(
            f"{device} has no native bf16: use --precision f32 (CPU) or f16 (GPU), or leave --precision out"
        )
    if precision == "f16" and device == "CPU":
        raise OpenVINOBuildError("f16 is for Intel GPUs; on a CPU use bf16 (where supported) or f32")
    if precision == "int8w":
        try:
            import nncf  # noqa: F401
        except ImportError as exc:
            raise OpenVINOMissing(f"--precision int8w needs NNCF ({exc}): {INSTALL_HINT}") from exc
    manifest.verify(export_dir)
    return manifest, precision, why, core


def _export_parts(manifest: mf.Manifest) -> set[str]:
    """Top-level names the export itself owns (graph folders, tokenizer, scheduler, manifest)."""
    parts = {Path(spec.file).parts[0] for spec in manifest.graphs.values()}
    parts |= {Path(str(manifest.scheduler)).parts[0], mf.MANIFEST_NAME}
    parts |= {Path(str(enc["tokenizer"])).parts[0] for enc in manifest.text_encoders}
    return parts


def validation_feeds(export_dir: Path, manifest: mf.Manifest, key: str) -> dict[str, np.ndarray]:
    """Seeded inputs for one graph at the export's default size: real token ids for text encoders."""
    from transformers import CLIPTokenizer

    from ..export.onnx_io import random_feeds

    for enc in manifest.text_encoders:
        if enc["graph"] == key:
            tokenizer = CLIPTokenizer.from_pretrained(str(export_dir / enc["tokenizer"]))
            ids = tokenizer(
                VALIDATION_PROMPTS, padding="max_length", max_length=manifest.text["max_length"], truncation=True
            ).input_ids
            return {"input_ids": np.asarray(ids, np.int64)}
    lat_h, lat_w = manifest.latent_size(int(manifest.defaults["height"]), int(manifest.defaults["width"]))
    return random_feeds(manifest, key, lat_h, lat_w)


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = ort_log_level()  # errors only; warnings too with --verbose
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return list(session.run(names, feeds))


def _convert(ov: ModuleType, core: Any, src: Path, xml: Path, int8: bool, writer: WeightWriter | None) -> int:
    """ONNX -> IR at ``xml``; with ``writer``, its weights go there (returns the bytes of them it uses)."""
    model = core.read_model(str(src))
    transpose_matmul_weights(model)
    if int8:
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)  # its per-layer table is for tuning, not for a build log
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    referenced = 0 if writer is None else externalize_weights(model, writer)
    ov.save_model(model, str(xml), compress_to_fp16=False)  # full-precision weights: precision is a compile choice
    del model
    return referenced


def build_openvino(
    export_dir: str | os.PathLike[str],
    name: str = OV_DIR,
    precision: str | None = None,
    device: str = "CPU",
    threads: int = 0,
    say: Callable[[str], None] = print,
    shared_weights: bool = True,
) -> dict[str, Any]:
    """Convert, compile and validate every graph; publish ``EXPORT/<name>/`` and the manifest's section.

    ``shared_weights``: every weight once in ``weights.bin`` (default); False: one self-contained IR per
    graph, each with its own copy of its weights (the layout of section format 1)."""
    from tqdm import tqdm

    export_dir = Path(export_dir)
    manifest, precision, why, core = check_request(export_dir, name, precision, device)
    if why:
        say(f"precision {precision}: {why}")
    ov = import_openvino()
    per_graph = graph_precisions(list(manifest.graphs), precision, device, core)
    graphs: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    caches: dict[str, dict[str, np.ndarray]] = {}  # graph -> its ORT outputs
    with mf.staged_dir(export_dir / name) as tmp:
        writer = WeightWriter(tmp / WEIGHTS_FILE) if shared_weights else None
        try:
            for key in tqdm(list(manifest.graphs), desc=f"openvino {precision}", unit="graph"):
                plan = per_graph[key]
                xml = tmp / f"{key}.xml"
                start = time.perf_counter()
                src = export_dir / manifest.graphs[key].file
                referenced = _convert(ov, core, src, xml, plan["weights"] == "int8", writer)
                weights = None
                if writer is not None:
                    writer.flush()
                    weights = map_weights(writer.path)
                model = read_bound(core, xml, weights)  # what the runtime compiles, from the files written
                compiled = core.compile_model(model, device, compile_config(plan["inference"], device, threads))
                seconds = time.perf_counter() - start
                del model
                row = _validate(export_dir, manifest, key, compiled, plan, caches)
                del compiled, weights
                rows.append({**row, "convert_compile_s": round(seconds, 2)})
                if not row["passed"]:
                    say(format_validation(rows))
                    raise OpenVINOBuildError(
                        f"{key}: OpenVINO {plan['inference']} output differs from ONNX Runtime fp32 by "
                        f"{row['relative_l2']:.3g} (relative L2) > {row['tolerance']}: nothing was written; "
                        "try --precision f32"
                    )
                files = [xml, xml.with_suffix(".bin")]
                graphs[key] = {
                    "xml": f"{name}/{xml.name}",
                    "files": {f"{name}/{f.name}": mf.sha256_file(f) for f in files},
                    **plan,
                }
                if writer is not None:
                    graphs[key]["weights_bytes"] = referenced  # of weights.bin, what this graph reads
        finally:
            if writer is not None:
                writer.close()
        section = {
            "target": TARGET,
            "format": SECTION_FORMAT if writer is not None else 1,
            "openvino": ov.get_version(),
            "device": device,
            "device_name": core.get_property(device, "FULL_DEVICE_NAME"),
            "precision": precision,
            "options": {"threads": threads, "performance_hint": "LATENCY", "num_streams": 1},
            "graphs": graphs,
            "validation": {
                "metric": "relative L2 error of every output vs ONNX Runtime fp32, seeded inputs, default size",
                "rows": rows,
            },
        }
        if writer is not None:
            rel = f"{name}/{WEIGHTS_FILE}"
            section["weights"] = {"file": rel, "sha256": mf.sha256_file(writer.path), "bytes": writer.size}
    with writer_lock(export_dir / mf.MANIFEST_NAME, wait=True):  # builds into other --out names, one at a time
        manifest = mf.Manifest.load(export_dir, verify=False)  # re-read: publish on top of the latest manifest
        manifest.extra.setdefault("engines", {})[name] = section
        manifest.save(export_dir)
    return section


def _validate(
    export_dir: Path,
    manifest: mf.Manifest,
    key: str,
    compiled: Any,
    plan: dict[str, Any],
    caches: dict[str, dict[str, np.ndarray]],
) -> dict[str, Any]:
    """One graph against ORT fp32 on seeded inputs; a replaying variant gets its source's real caches."""
    spec = manifest.graphs[key]
    feeds = validation_feeds(export_dir, manifest, key)
    if key in manifest.variants:  # a replaying graph gets real caches, as in a pipeline
        variants = [GraphVariant.from_dict(k, v) for k, v in manifest.variants.items()]
        variant = GraphVariant.from_dict(key, manifest.variants[key])
        for kind in variant.replay:
            source = source_of(variants, variant, kind).key
            feeds.update({n: caches[source][n] for n in manifest.sites[kind]})
    names = [o.name for o in spec.outputs]
    want = _ort_outputs(export_dir / spec.file, feeds, names)
    caches[key] = dict(zip(names, want, strict=True))
    result = compiled.create_infer_request().infer(feeds)
    got = [np.asarray(result[compiled.output(n)]) for n in names]
    errors = {n: relative_error(g, w) for n, g, w in zip(names, got, want, strict=True)}
    limit = TOLERANCES["int8w" if plan["weights"] == "int8" else plan["inference"]]
    worst = float(np.max(list(errors.values())))  # NaN anywhere is the worst, not skipped
    return {
        "graph": key,
        "weights": plan["weights"],
        "inference": plan["inference"],
        "worst_output": max(errors, key=lambda n: errors[n]),
        "relative_l2": worst,
        "max_abs_diff": max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)),
        "tolerance": limit,
        "passed": bool(np.isfinite(worst) and worst <= limit),
    }


def format_validation(rows: list[dict[str, Any]]) -> str:
    header = f"{'graph':<15} {'weights':>7} {'math':>5} {'worst output':<14} {'rel. L2':>9} {'tolerance':>9}  pass"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['graph']:<15} {r['weights']:>7} {r['inference']:>5} {r['worst_output']:<14} "
            f"{r['relative_l2']:>9.2e} {r['tolerance']:>9.1e}  {'yes' if r['passed'] else 'NO'}"
        )
    return "\n".join(lines)
