"""One export, start to finish: load, export four graphs, validate, write the manifest, publish atomically.

Everything is built in a temp folder beside the destination and renamed into place only after every
graph passed validation, so an interrupted or failed export never leaves a half-written folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .. import manifest as mf
from ..contract import limits
from ..contract.errors import UserError
from ..contract.files import MARKER, OutputDir
from ..families import (
    ARCHITECTURES,
    CHECKPOINT_SUFFIXES,
    FAMILY_DEFAULTS,
    PRESETS,
    ModelLoadError,
    SourceModel,
    apply_lcm_lora,
    check_diffusers_folder,
    detect_family,
    resolve_model,
    text_section,
)
from ..families.zoo import zoo_model
from ..methods.variants import SCHEDULES, variants_for
from .graphs import (
    ExportOptions,
    cache_sites,
    export_standard_parts,
    export_variant,
    text_encoder_keys,
    vae_upcast,
    variant_modules,
)
from .memory import record_memory
from .onnx_io import SharedWeights, describe
from .validate import Check, validate_export

MIN_OPSET, MAX_OPSET = 18, 20  # >= 18 for TensorRT's LayerNorm mapping; 20 is the legacy exporter's max
DTYPES = ("fp32", "fp16")
DEFAULTS = FAMILY_DEFAULTS["sd"]
STAGES = (
    "load model",
    "text encoder(s) + VAE decoder",
    "UNet graphs before the gate",
    "UNet graphs after the gate",
    "validate",
    "manifest",
)


class ExportError(UserError, RuntimeError):
    """An export that can't start or didn't validate; the message says what to change."""


@dataclass
class ExportRequest:
    model: str
    out: Path
    dtype: str = "fp32"
    opset: int = 18
    height: int | None = None
    width: int | None = None
    random_weights: bool = False
    config: str | None = None  # configs + tokenizer for single-file checkpoints
    lcm_lora: str | None = None  # an LCM-LoRA .safetensors fused into the UNet (guidance-free result)
    force: bool = False
    schedule: str = "v1"  # v1: pre/post-gate graphs; v2: the variants self-attention caching needs too
    extra: dict[str, Any] = field(default_factory=dict)


def check_request(req: ExportRequest) -> None:
    """Every check that needs no model weights, so bad input fails in milliseconds."""
    if req.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {req.dtype!r}")
    if req.schedule not in SCHEDULES:
        raise ExportError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {req.schedule!r}")
    if not MIN_OPSET <= req.opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {req.opset}")
    for name, value in (("height", req.height), ("width", req.width)):
        if value is not None and value <= 0:
            raise ExportError(f"--{name} must be positive, got {value}")
    if req.lcm_lora is not None:
        lora = Path(req.lcm_lora)
        if not lora.is_file() or lora.suffix != ".safetensors":
            raise ExportError(f"--lcm-lora {lora} is not a .safetensors file: pass the LoRA's weights file")
    if req.config is not None and not Path(req.config).is_dir():
        raise ExportError(f"--config {req.config} is not a folder: pass a diffusers folder with configs + tokenizer")
    output_dir(req).check()
    _check_model(req)
    arch = ARCHITECTURES.get(req.model) if req.model in ARCHITECTURES else None
    if arch is not None:
        _check_size(req, _multiple(arch["unet"], arch["vae"]))
        _check_pixels(req, arch["unet"]["sample_size"] * 2 ** (len(arch["vae"]["block_out_channels"]) - 1))
    zoo = zoo_model(req.model) if req.model in PRESETS else None
    if zoo is not None and "native_size" in zoo.DEFAULTS:
        _check_native(req, zoo.DEFAULTS["native_size"])


def _check_native(req: ExportRequest, native: list[int]) -> None:
    """A model that draws only at its native size (recorded as ``defaults.native_size``) is exported at it."""
    height, width = native
    if (req.height or height, req.width or width) != (height, width):
        raise ExportError(
            f"{req.model} draws only at its native size {height}x{width} (it was trained at that size), got "
            f"--height {req.height or height} --width {req.width or width}: leave them unset"
        )


def _check_model(req: ExportRequest) -> None:
    """What ``resolve_model`` refuses before reading any weights, refused here before the progress bar."""
    model, path = req.model, Path(req.model).expanduser()
    if req.random_weights and model not in ARCHITECTURES:
        raise ExportError(f"--random-weights needs a preset name ({', '.join(ARCHITECTURES)}), got {model!r}")
    if model in ARCHITECTURES or model in PRESETS:
        return
    if path.is_dir():
        try:
            check_diffusers_folder(path)
        except ModelLoadError as exc:
            raise ExportError(str(exc)) from None
    elif path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ExportError(
                f"{path} is not a checkpoint: single-file models end in {' or '.join(CHECKPOINT_SUFFIXES)}"
            )
    elif path.suffix in CHECKPOINT_SUFFIXES or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ExportError(f"{model} does not exist: pass an existing folder or checkpoint file")
    elif model.count("/") != 1:
        raise ExportError(
            f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a local diffusers folder, "
            "a .safetensors/.ckpt file, or a hub id such as org/name"
        )


def schedule_defaults(schedule: str, family: mf.ModelFamily) -> dict[str, int]:
    """Self-attention caching defaults: the authors' V2 (5 / 1 / 2) with CFG; none for guidance-free
    families (their LCM mode runs 1 / 1 / 0) and for V1."""
    if schedule == "v2" and family.cfg:
        return {"sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    return {"sp_interval": 1, "fi_interval": 1, "warm_up": 0}


def output_dir(req: ExportRequest) -> OutputDir:
    """Where the export goes; the model, config and LoRA it reads are sources ``--out`` must not touch."""
    sources: list[str | Path | None] = [req.config, req.lcm_lora]
    if Path(req.model).expanduser().exists():
        sources.append(Path(req.model).expanduser())
    zoo = zoo_model(req.model) if req.model in PRESETS else None
    if zoo is not None:
        sources.append(zoo.WEIGHTS)
    return OutputDir(req.out, force=req.force, sources=sources)


def _multiple(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2 ** (len(unet_cfg["block_out_channels"]) - 1)


def _check_size(req: ExportRequest, multiple: int) -> None:
    for name, value in (("height", req.height), ("width", req.width)):
        if value is not None and value % multiple:
            raise ExportError(f"--{name} must be a multiple of {multiple} for this model, got {value}")


def _check_pixels(req: ExportRequest, native: int) -> None:
    """Tracing and validation sizes within 4x the model's native size per side (a memory budget)."""
    height, width = req.height or native, req.width or native
    cap = limits.PIXEL_FACTOR * limits.default_max_pixels(native, native)
    if height * width > cap:
        raise ExportError(
            f"--height {height} --width {width} is {height * width:,} pixels, over {cap:,} (4x this model's "
            f"native {native}x{native} per side): export at a smaller size"
        )


def _tool_versions() -> dict[str, str]:
    out = {}
    for pkg in (
        "tgate-trt",
        "torch",
        "diffusers",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _save_assets(pipe: Any, root: Path, family: mf.ModelFamily) -> None:
    pipe.tokenizer.save_pretrained(root / "tokenizer")
    pipe.scheduler.save_pretrained(root / "scheduler")
    configs = [
        (mf.TEXT_ENCODER, pipe.text_encoder.config.to_json_string()),
        (mf.VAE_DECODER, json.dumps(dict(pipe.vae.config), indent=2, default=str)),
        (mf.UNET, json.dumps(dict(pipe.unet.config), indent=2, default=str)),  # once, beside the variants
    ]
    if family.added_conditioning:
        pipe.tokenizer_2.save_pretrained(root / "tokenizer_2")
        configs.append((mf.TEXT_ENCODER_2, pipe.text_encoder_2.config.to_json_string()))
    for key, config in configs:
        (root / key).mkdir(parents=True, exist_ok=True)
        (root / key / "config.json").write_text(config)


def build_manifest(
    src: SourceModel,
    root: Path,
    opts: ExportOptions,
    params: dict[str, int],
    layers: list[mf.CacheLayer],
    checks: list[Check],
    family: mf.ModelFamily,
    schedule: str = "v1",
) -> mf.Manifest:
    pipe = src.pipe
    variants = variants_for(schedule, family.cfg)
    keys = [*text_encoder_keys(family), *(v.key for v in variants), mf.VAE_DECODER]
    latent = {
        "channels": pipe.unet.config.in_channels,
        "vae_scale_factor": pipe.vae_scale_factor,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "multiple": 2 ** (len(pipe.unet.config.block_out_channels) - 1),
    }
    if vae_upcast(pipe, family, opts):
        latent["vae_decoder_dtype"] = "fp32"
        latent["vae_decoder_note"] = "kept in fp32: this VAE overflows in fp16 (force_upcast)"
    defaults = {**FAMILY_DEFAULTS[family.family], **src.defaults, "height": opts.height, "width": opts.width}
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    defaults["max_pixels"] = limits.default_max_pixels(max(native, opts.height), max(native, opts.width))
    defaults.update(schedule_defaults(schedule, family))
    unets = {v.key for v in variants}
    graphs = {k: describe(root / mf.graph_file(k, k in unets), root, params[k]) for k in keys}
    return mf.Manifest(
        source=src.source,
        dtype=opts.dtype,
        opset=opts.opset,
        graphs=graphs,
        cache_layers=layers,
        latent=latent,
        text=text_section(pipe, family),
        defaults=defaults,
        scheduler="scheduler",
        tools=_tool_versions(),
        gate={"semantics": mf.gate_semantics(family), "cfg_in_graph": family.cfg},
        validation=[c.row() for c in checks],
        model=family,
        files=other_files(root, graphs),
        schedule=schedule,
        variants={v.key: v.to_dict() for v in variants},
    )


def other_files(root: Path, graphs: dict[str, mf.GraphSpec]) -> dict[str, str]:
    """sha256 of every file that isn't a graph's (tokenizers, scheduler, configs): the runtime reads them too."""
    taken = {rel for g in graphs.values() for rel in g.files} | {mf.MANIFEST_NAME, MARKER}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {rel: mf.sha256_file(root / rel) for rel in files if rel not in taken}


def run_export(req: ExportRequest, progress: Callable[[str], None] | None = None) -> tuple[mf.Manifest, list[Check]]:
    """Export ``req.model`` to ``req.out``; raises :class:`ExportError` (nothing written) on failure."""
    check_request(req)

    def stage(msg: str) -> None:
        if progress:
            progress(msg)

    stage(STAGES[0])
    try:
        src = resolve_model(req.model, req.random_weights, req.config)
        if req.lcm_lora:
            src = apply_lcm_lora(src, Path(req.lcm_lora))
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from exc
    pipe = src.pipe
    try:
        family = detect_family(pipe)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from exc
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    _check_size(req, multiple)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    _check_pixels(req, default)
    opts = ExportOptions(req.dtype, req.opset, req.height or default, req.width or default)
    pipe.to(opts.torch_dtype)
    if vae_upcast(pipe, family, opts):
        pipe.vae.to(torch.float32)

    variants = variants_for(req.schedule, family.cfg)
    with output_dir(req) as tmp:
        _save_assets(pipe, tmp, family)
        stage(STAGES[1])
        params = export_standard_parts(pipe, tmp, opts, family)
        layers = cache_sites(pipe, opts, family, ("attn2",) if req.schedule == "v1" else ("attn2", "attn1"))
        modules = variant_modules(pipe, variants, family)
        with SharedWeights(tmp / mf.UNET) as shared:  # every UNet weight once, whatever the number of variants
            for before in (True, False):  # the graphs that read text (before the gate), then the rest
                stage(STAGES[2] if before else STAGES[3])
                for v in variants:
                    if v.reads_text == before:
                        params[v.key] = export_variant(pipe, modules, v.key, layers, shared, opts)
        stage(STAGES[4])
        checks = validate_export(pipe, tmp, opts, family, variants=variants)
        failed = [c for c in checks if not c.passed]
        if failed:
            from .validate import format_table

            raise ExportError(
                "validation failed: ONNX Runtime and PyTorch disagree beyond tolerance; nothing was "
                f"written to {req.out}\n{format_table(checks)}"
            )
        stage(STAGES[5])
        manifest = build_manifest(src, tmp, opts, params, layers, checks, family, req.schedule)
        manifest.extra.update(req.extra)
        record_memory(tmp, manifest)  # defaults.memory: the runtime's pixel cap, from a measured fit
        manifest.save(tmp)
    return manifest, checks
