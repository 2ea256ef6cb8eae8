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
from .families import FAMILY_DEFAULTS, detect_family, text_section
from .graphs import (
    ExportOptions,
    cache_layers,
    export_postgate,
    export_pregate,
    export_standard_parts,
    text_encoder_keys,
    vae_upcast,
)
from .models import ARCHITECTURES, ModelLoadError, SourceModel, apply_lcm_lora, resolve_model
from .onnx_io import describe
from .validate import Check, validate_export

MIN_OPSET, MAX_OPSET = 18, 20  # >= 18 for TensorRT's LayerNorm mapping; 20 is the legacy exporter's max
DTYPES = ("fp32", "fp16")
DEFAULTS = FAMILY_DEFAULTS["sd"]
STAGES = (
    "load model",
    "text encoder(s) + VAE decoder",
    "pre-gate UNet",
    "post-gate UNet",
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
    extra: dict[str, Any] = field(default_factory=dict)


def check_request(req: ExportRequest) -> None:
    """Every check that needs no model weights, so bad input fails in milliseconds."""
    if req.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {req.dtype!r}")
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
    arch = ARCHITECTURES.get(req.model) if req.model in ARCHITECTURES else None
    if arch is not None:
        _check_size(req, _multiple(arch["unet"], arch["vae"]))


def output_dir(req: ExportRequest) -> OutputDir:
    """Where the export goes; the model, config and LoRA it reads are sources ``--out`` must not touch."""
    sources: list[str | Path | None] = [req.config, req.lcm_lora]
    if Path(req.model).expanduser().exists():
        sources.append(Path(req.model).expanduser())
    if req.model == "shapes":
        from .shapes import WEIGHTS

        sources.append(WEIGHTS)
    return OutputDir(req.out, force=req.force, sources=sources)


def _multiple(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2 ** (len(unet_cfg["block_out_channels"]) - 1)


def _check_size(req: ExportRequest, multiple: int) -> None:
    for name, value in (("height", req.height), ("width", req.width)):
        if value is not None and value % multiple:
            raise ExportError(f"--{name} must be a multiple of {multiple} for this model, got {value}")


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
    unet_cfg = json.dumps(dict(pipe.unet.config), indent=2, default=str)
    configs = [
        (mf.TEXT_ENCODER, pipe.text_encoder.config.to_json_string()),
        (mf.VAE_DECODER, json.dumps(dict(pipe.vae.config), indent=2, default=str)),
        (mf.PREGATE, unet_cfg),
        (mf.POSTGATE, unet_cfg),
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
    family: mf.ModelFamily | None = None,
) -> mf.Manifest:
    pipe = src.pipe
    family = family or detect_family(pipe)
    keys = [*text_encoder_keys(family), mf.PREGATE, mf.POSTGATE, mf.VAE_DECODER]
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
    graphs = {k: describe(root / k, root, params[k]) for k in keys}
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
    )


def other_files(root: Path, graphs: dict[str, mf.GraphSpec]) -> dict[str, str]:
    """sha256 of every file that isn't a graph's (tokenizers, scheduler, configs): the runtime reads them too."""
    taken = {rel for g in graphs.values() for rel in g.files} | {mf.MANIFEST_NAME, MARKER}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {rel: mf.sha256_file(root / rel) for rel in files if rel not in taken}


def run_export(
    req: ExportRequest, progress: Callable[[str], None] | None = None
) -> tuple[mf.Manifest, list[Check]]:
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
    opts = ExportOptions(req.dtype, req.opset, req.height or default, req.width or default)
    pipe.to(opts.torch_dtype)
    if vae_upcast(pipe, family, opts):
        pipe.vae.to(torch.float32)

    with output_dir(req) as tmp:
        _save_assets(pipe, tmp, family)
        stage(STAGES[1])
        params = export_standard_parts(pipe, tmp, opts, family)
        layers = cache_layers(pipe, opts, family)
        stage(STAGES[2])
        params[mf.PREGATE] = export_pregate(pipe, layers, tmp / mf.PREGATE, opts, family)
        stage(STAGES[3])
        params[mf.POSTGATE] = export_postgate(pipe, layers, tmp / mf.POSTGATE, opts, family)
        stage(STAGES[4])
        checks = validate_export(pipe, tmp, opts, family=family)
        failed = [c for c in checks if not c.passed]
        if failed:
            from .validate import format_table

            raise ExportError(
                "validation failed: ONNX Runtime and PyTorch disagree beyond tolerance; nothing was "
                f"written to {req.out}\n{format_table(checks)}"
            )
        stage(STAGES[5])
        manifest = build_manifest(src, tmp, opts, params, layers, checks, family)
        manifest.extra.update(req.extra)
        manifest.save(tmp)
    return manifest, checks
