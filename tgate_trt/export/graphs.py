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


def _export(
    module: torch.nn.Module, args: tuple[Any, ...], raw: Path, opts: ExportOptions, **kw: Any
) -> None:
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


def unet_example(pipe: Any, opts: ExportOptions, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded pre-gate inputs at ``batch`` and the options' image size."""
    gen = torch.Generator().manual_seed(seed)
    factor = pipe.vae_scale_factor
    h, w = opts.height // factor, opts.width // factor
    seq = pipe.tokenizer.model_max_length
    dim = pipe.unet.config.cross_attention_dim
    dt = opts.torch_dtype
    return {
        mf.SAMPLE: torch.randn(batch, pipe.unet.config.in_channels, h, w, generator=gen).to(dt),
        mf.TIMESTEP: torch.tensor([500.0]),
        mf.PROMPT_EMBEDS: torch.randn(batch, seq, dim, generator=gen).to(dt),
        mf.NEGATIVE_PROMPT_EMBEDS: torch.randn(batch, seq, dim, generator=gen).to(dt),
        mf.GUIDANCE_SCALE: torch.tensor([7.5]),
    }


def cache_layers(pipe: Any, opts: ExportOptions) -> list[mf.CacheLayer]:
    """Probe the pre-gate UNet once: channels and spatial level of every attn2, in cache order."""
    pre = PreGateUNet(pipe.unet)
    example = unet_example(pipe, opts)
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


def export_pregate(pipe: Any, layers: list[mf.CacheLayer], folder: Path, opts: ExportOptions) -> int:
    pre = PreGateUNet(pipe.unet)
    example = unet_example(pipe, opts)
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
            dynamic_axes={
                mf.SAMPLE: _LATENT_AXES,
                mf.PROMPT_EMBEDS: {0: mf.BATCH},
                mf.NEGATIVE_PROMPT_EMBEDS: {0: mf.BATCH},
                mf.NOISE_PRED: _LATENT_AXES,
                **_cache_axes(layers),
            },
        )
        return finalize(raw, folder, opts.force_external_data)


def export_postgate(pipe: Any, layers: list[mf.CacheLayer], folder: Path, opts: ExportOptions) -> int:
    pre, post = PreGateUNet(pipe.unet), PostGateUNet(pipe.unet)
    example = unet_example(pipe, opts)
    with torch.no_grad():
        _, *caches = pre(**example)
    names = [c.name for c in layers]
    with ScratchDir(folder.parent) as scratch:
        raw = scratch / "model.onnx"
        _export(
            post,
            (example[mf.SAMPLE], example[mf.TIMESTEP], *caches),
            raw,
            opts,
            input_names=[mf.SAMPLE, mf.TIMESTEP, *names],
            output_names=[mf.NOISE_PRED],
            dynamic_axes={mf.SAMPLE: _LATENT_AXES, mf.NOISE_PRED: _LATENT_AXES, **_cache_axes(layers)},
        )
        return finalize(raw, folder, opts.force_external_data)


def export_standard_parts(pipe: Any, root: Path, opts: ExportOptions) -> dict[str, int]:
    """Text encoder and VAE decoder through optimum's exporter, in its folder layout.

    optimum works offline on an in-memory pipeline, so the parts that T-GATE leaves untouched get the
    same graphs (inputs ``input_ids`` / ``latent_sample``) that optimum's own SD export produces.
    """
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    models = get_diffusion_models_for_export(pipe, int_dtype="int64", float_dtype=opts.dtype)
    wanted = {k: models[k] for k in (mf.TEXT_ENCODER, mf.VAE_DECODER)}
    params = {}
    with ScratchDir(root) as scratch:
        with quiet():
            export_models(
                wanted,
                scratch,
                opset=opts.opset,
                output_names=[f"{k}/model.onnx" for k in wanted],
                dtype="fp16" if opts.dtype == "fp16" else None,
            )
        for key in wanted:
            params[key] = finalize(scratch / key / "model.onnx", root / key, opts.force_external_data)
    return params
