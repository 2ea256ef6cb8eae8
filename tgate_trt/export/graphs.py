"""Export the UNet as the pre-gate and post-gate ONNX graphs, plus optimum's standard parts."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import manifest as mf
from .families import detect_family
from .onnx_io import ScratchDir, finalize
from .tgate import PostGateUNet, PreGateUNet


@dataclass
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16
    opset: int = 18
    height: int = 512  # image size used for tracing
    width: int = 512
    force_external_data: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.dtype == "fp16" else torch.float32


@contextmanager
def quiet() -> Iterator[None]:
    """The legacy exporter warns about every traced Python branch; they are expected for a UNet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export(module: torch.nn.Module, args: tuple[Any, ...], raw: Path, opts: ExportOptions, **kw: Any) -> None:
    with quiet(), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(raw),
            dynamo=False,  # the TorchScript exporter is what TensorRT's demo and optimum use for UNets
            opset_version=opts.opset,
            do_constant_folding=True,
            **kw,
        )


def unet_example(
    pipe: Any, opts: ExportOptions, batch: int = 1, seed: int = 0, family: mf.ModelFamily | None = None
) -> dict[str, torch.Tensor]:
    """Seeded pre-gate inputs at ``batch`` and the options' image size, named as the graph's inputs."""
    family = family or detect_family(pipe)
    gen = torch.Generator().manual_seed(seed)
    factor = pipe.vae_scale_factor
    h, w = opts.height // factor, opts.width // factor
    seq = pipe.tokenizer.model_max_length
    dim = pipe.unet.config.cross_attention_dim
    dt = opts.torch_dtype
    example = {
        mf.SAMPLE: torch.randn(batch, pipe.unet.config.in_channels, h, w, generator=gen).to(dt),
        mf.TIMESTEP: torch.tensor([500.0]),
        mf.PROMPT_EMBEDS: torch.randn(batch, seq, dim, generator=gen).to(dt),
        mf.NEGATIVE_PROMPT_EMBEDS: torch.randn(batch, seq, dim, generator=gen).to(dt),
        mf.GUIDANCE_SCALE: torch.tensor([7.5]),
    }
    if family.added_conditioning:
        pooled = pipe.text_encoder_2.config.projection_dim
        # Realistic micro-conditioning: (original size, crop top-left, target size), in fp32 like timestep.
        ids = torch.tensor([[opts.height, opts.width, 0, 0, opts.height, opts.width]], dtype=torch.float32)
        example[mf.TEXT_EMBEDS] = torch.randn(batch, pooled, generator=gen).to(dt)
        example[mf.NEGATIVE_TEXT_EMBEDS] = torch.randn(batch, pooled, generator=gen).to(dt)
        example[mf.TIME_IDS] = ids.repeat(batch, 1)
        example[mf.NEGATIVE_TIME_IDS] = (ids + torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0, 0.0]])).repeat(batch, 1)
    names = [mf.SAMPLE, mf.TIMESTEP, *mf.conditioning_inputs(family, postgate=False)]
    return {n: example[n] for n in names}


def postgate_example(
    pipe: Any, example: dict[str, torch.Tensor], caches: list[torch.Tensor], family: mf.ModelFamily | None = None
) -> dict[str, torch.Tensor]:
    """Post-gate inputs: the pre-gate example's sample and conditioning (the negative branch's added
    conditioning with CFG) with ``caches``, named as the graph's inputs."""
    family = family or detect_family(pipe)
    out = {mf.SAMPLE: example[mf.SAMPLE], mf.TIMESTEP: torch.tensor([250.0])}
    out.update({n: example[n] for n in mf.conditioning_inputs(family, postgate=True)})
    out.update({mf.cache_name(i): c for i, c in enumerate(caches)})
    return out


def cache_layers(pipe: Any, opts: ExportOptions, family: mf.ModelFamily | None = None) -> list[mf.CacheLayer]:
    """Probe the pre-gate UNet once: channels and spatial level of every attn2, in cache order."""
    pre = PreGateUNet(pipe.unet, family)
    example = unet_example(pipe, opts, family=pre.family)
    with torch.no_grad():
        _, *caches = pre(**example)
    h, w = example[mf.SAMPLE].shape[-2:]
    layers = []
    for i, (name, cache) in enumerate(zip(pre.names, caches, strict=True)):
        level = round(math.sqrt(h * w / cache.shape[1]))
        if (h // level) * (w // level) != cache.shape[1]:
            raise RuntimeError(f"{name}: cache of {cache.shape[1]} tokens is not a downsampled {h}x{w} grid")
        layers.append(mf.CacheLayer(i, mf.cache_name(i), name, int(cache.shape[2]), level))
    return layers


def _cache_axes(layers: list[mf.CacheLayer]) -> dict[str, dict[int, str]]:
    return {c.name: {0: mf.BATCH, 1: mf.hw_dim(c.level)} for c in layers}


_LATENT_AXES = {0: mf.BATCH, 2: mf.LATENT_H, 3: mf.LATENT_W}


def _input_axes(names: list[str]) -> dict[str, dict[int, str]]:
    """Batch is dynamic on every conditioning input except the scalar guidance scale."""
    axes = {n: {0: mf.BATCH} for n in names if n not in (mf.TIMESTEP, mf.GUIDANCE_SCALE)}
    return {**axes, mf.SAMPLE: _LATENT_AXES}


def export_pregate(
    pipe: Any, layers: list[mf.CacheLayer], folder: Path, opts: ExportOptions, family: mf.ModelFamily | None = None
) -> int:
    pre = PreGateUNet(pipe.unet, family)
    example = unet_example(pipe, opts, family=pre.family)
    names = [c.name for c in layers]
    with ScratchDir(folder.parent) as scratch:
        raw = scratch / "model.onnx"
        _export(
            pre,
            tuple(example.values()),
            raw,
            opts,
            input_names=list(example),
            output_names=[mf.NOISE_PRED, *names],
            dynamic_axes={**_input_axes(list(example)), mf.NOISE_PRED: _LATENT_AXES, **_cache_axes(layers)},
        )
        return finalize(raw, folder, opts.force_external_data)


def export_postgate(
    pipe: Any, layers: list[mf.CacheLayer], folder: Path, opts: ExportOptions, family: mf.ModelFamily | None = None
) -> int:
    pre, post = PreGateUNet(pipe.unet, family), PostGateUNet(pipe.unet, family)
    example = unet_example(pipe, opts, family=pre.family)
    with torch.no_grad():
        _, *caches = pre(**example)
    inputs = postgate_example(pipe, example, caches, pre.family)
    with ScratchDir(folder.parent) as scratch:
        raw = scratch / "model.onnx"
        _export(
            post,
            tuple(inputs.values()),
            raw,
            opts,
            input_names=list(inputs),
            output_names=[mf.NOISE_PRED],
            dynamic_axes={**_input_axes(list(inputs)), mf.NOISE_PRED: _LATENT_AXES, **_cache_axes(layers)},
        )
        return finalize(raw, folder, opts.force_external_data)


def vae_upcast(pipe: Any, family: mf.ModelFamily, opts: ExportOptions) -> bool:
    """SDXL's VAE overflows in fp16 (``force_upcast``; diffusers' SDXL pipelines decode it in fp32), so
    an fp16 export keeps its decoder in fp32. SD pipelines ignore the flag, and so do we."""
    return opts.dtype == "fp16" and family.added_conditioning and bool(pipe.vae.config.get("force_upcast", False))


def text_encoder_keys(family: mf.ModelFamily) -> tuple[str, ...]:
    return (mf.TEXT_ENCODER, mf.TEXT_ENCODER_2) if family.added_conditioning else (mf.TEXT_ENCODER,)


def export_standard_parts(
    pipe: Any, root: Path, opts: ExportOptions, family: mf.ModelFamily | None = None
) -> dict[str, int]:
    """Text encoder(s) and VAE decoder through optimum's exporter, in its folder layout.

    optimum works offline on an in-memory pipeline, so the parts that T-GATE leaves untouched get the
    same graphs (inputs ``input_ids`` / ``latent_sample``) that optimum's own SD/SDXL export produces.
    An upcast VAE decoder (see :func:`vae_upcast`) is exported on its own, from the fp32 VAE.
    """
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    family = family or detect_family(pipe)
    upcast = vae_upcast(pipe, family, opts)
    models = get_diffusion_models_for_export(pipe, int_dtype="int64", float_dtype=opts.dtype)
    batches = [({k: models[k] for k in text_encoder_keys(family)}, opts.dtype)]
    if upcast:
        fp32_models = get_diffusion_models_for_export(pipe, int_dtype="int64", float_dtype="fp32")
        batches.append(({mf.VAE_DECODER: fp32_models[mf.VAE_DECODER]}, "fp32"))
    else:
        batches[0][0][mf.VAE_DECODER] = models[mf.VAE_DECODER]
    params = {}
    with ScratchDir(root) as scratch:
        for wanted, dtype in batches:
            with quiet():
                export_models(
                    wanted,
                    scratch,
                    opset=opts.opset,
                    output_names=[f"{k}/model.onnx" for k in wanted],
                    dtype="fp16" if dtype == "fp16" else None,
                )
            for key in wanted:
                params[key] = finalize(scratch / key / "model.onnx", root / key, opts.force_external_data)
    return params


def export_plain_unet(pipe: Any, root: Path, opts: ExportOptions) -> int:
    """The standard, ungated UNet through optimum's exporter into ``root/unet`` (graph + config).

    Not part of a T-GATE export: it lets optimum's own ``ORTStableDiffusionPipeline`` run beside ours on
    the same text encoder and VAE decoder, as the standard ONNX deployment to compare against.
    """
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    models = get_diffusion_models_for_export(pipe, int_dtype="int64", float_dtype=opts.dtype)
    with ScratchDir(root) as scratch:
        with quiet():
            export_models(
                {mf.UNET: models[mf.UNET]},
                scratch,
                opset=opts.opset,
                output_names=[f"{mf.UNET}/model.onnx"],
                dtype="fp16" if opts.dtype == "fp16" else None,
            )
        params = finalize(scratch / mf.UNET / "model.onnx", root / mf.UNET, opts.force_external_data)
    pipe.unet.save_config(root / mf.UNET)
    return params
