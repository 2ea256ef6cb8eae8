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
from ..methods.plan import FULL, KINDS
from ..methods.variants import CACHE_PREFIX, GraphVariant, cache_tensor, source_of
from .onnx_io import ScratchDir, SharedWeights, finalize
from .tgate import VariantUNet


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
    pipe: Any, opts: ExportOptions, batch: int = 1, seed: int = 0, *, family: mf.ModelFamily
) -> dict[str, torch.Tensor]:
    """Seeded UNet inputs at ``batch`` and the options' image size: the sample and every conditioning
    input any variant of ``family`` takes (each variant picks its own with :func:`variant_feeds`)."""
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
    return example


def variant_feeds(
    modules: dict[str, VariantUNet], variant: GraphVariant, example: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inputs of ``variant``'s graph, named and ordered as the graph's: the example's sample and
    conditioning, and for each replayed kind the caches its source variant captures from the example."""
    module = modules[variant.key]
    feeds = {n: example[n] for n in (mf.SAMPLE, *module.conditioning)}
    feeds[mf.TIMESTEP] = torch.tensor([500.0 if variant.reads_text else 250.0])
    for kind in KINDS:
        if kind in variant.replay:
            src = modules[source_of([m.variant for m in modules.values()], variant, kind).key]
            with torch.no_grad():
                out = dict(zip(src.output_names, src(**variant_feeds(modules, src.variant, example)), strict=True))
            feeds.update({n: out[n] for n in src.cache_outputs() if n.startswith(CACHE_PREFIX[kind])})
    return {n: feeds[n] for n in module.input_names}


def cache_sites(
    pipe: Any, opts: ExportOptions, family: mf.ModelFamily, kinds: tuple[str, ...] = ("attn2",)
) -> list[mf.CacheLayer]:
    """Probe the UNet once: channels and spatial level of every cache site of ``kinds``, in graph order
    (attn2 first, as V1 numbered them, then attn1)."""
    capture = tuple((k, FULL) for k in ("attn2", "attn1") if k in kinds)
    probe = VariantUNet(pipe.unet, GraphVariant("probe", False, capture=capture), family)
    example = unet_example(pipe, opts, family=family)
    with torch.no_grad():
        outputs = probe(**variant_feeds({"probe": probe}, probe.variant, example))
    out = dict(zip(probe.output_names, outputs, strict=True))
    h, w = example[mf.SAMPLE].shape[-2:]
    layers = []
    for kind, _ in capture:
        for i, module in enumerate(probe.kinds[kind][1]):
            name = cache_tensor(kind, i)
            cache = out[name]
            level = round(math.sqrt(h * w / cache.shape[1]))
            if (h // level) * (w // level) != cache.shape[1]:
                raise RuntimeError(f"{module}: cache of {cache.shape[1]} tokens is not a downsampled {h}x{w} grid")
            layers.append(mf.CacheLayer(i, name, module, int(cache.shape[2]), level, kind))
    return layers


def cache_layers(pipe: Any, opts: ExportOptions, family: mf.ModelFamily) -> list[mf.CacheLayer]:
    """V1's cache sites: every attn2, in execution order."""
    return cache_sites(pipe, opts, family)


def _cache_axes(layers: list[mf.CacheLayer], names: list[str], layout: dict[str, str]) -> dict[str, dict[int, str]]:
    """Dynamic axes of cache tensors; ``layout`` per kind: a whole CFG batch (``full`` in a CFG graph) is
    ``2 * batch``, a CFG mean or any cache of a graph without CFG is ``batch``."""
    by_name = {c.name: c for c in layers}
    return {
        n: {0: mf.CFG_BATCH if layout.get(by_name[n].kind) == "cfg" else mf.BATCH, 1: mf.hw_dim(by_name[n].level)}
        for n in names
    }


_LATENT_AXES = {0: mf.BATCH, 2: mf.LATENT_H, 3: mf.LATENT_W}


def _input_axes(names: list[str]) -> dict[str, dict[int, str]]:
    """Batch is dynamic on every conditioning input except the scalar guidance scale."""
    axes = {n: {0: mf.BATCH} for n in names if n not in (mf.TIMESTEP, mf.GUIDANCE_SCALE)}
    return {**axes, mf.SAMPLE: _LATENT_AXES}


def variant_modules(pipe: Any, variants: tuple[GraphVariant, ...], family: mf.ModelFamily) -> dict[str, VariantUNet]:
    return {v.key: VariantUNet(pipe.unet, v, family) for v in variants}


def export_variant(
    pipe: Any,
    modules: dict[str, VariantUNet],
    key: str,
    layers: list[mf.CacheLayer],
    shared: SharedWeights,
    opts: ExportOptions,
) -> int:
    """One UNet variant as ``unet/<key>.onnx``, its weights in the variants' one shared file; returns its
    parameter count."""
    module = modules[key]
    inputs = variant_feeds(modules, module.variant, unet_example(pipe, opts, family=module.family))
    cache_in = [n for n in inputs if n in {c.name for c in layers}]
    cache_out = module.cache_outputs()
    v = module.variant
    axes = {
        **_input_axes([n for n in inputs if n not in cache_in]),
        mf.NOISE_PRED: _LATENT_AXES,
        # a CFG graph replays whole-batch caches; it captures whole-batch or CFG-mean ones, as declared
        **_cache_axes(layers, cache_in, {k: "cfg" for k in v.replay} if v.cfg else {}),
        **_cache_axes(layers, cache_out, {k: "cfg" for k, lay in v.capture if lay == FULL} if v.cfg else {}),
    }
    with ScratchDir(shared.folder.parent) as scratch:
        raw = scratch / "model.onnx"
        _export(
            module,
            tuple(inputs.values()),
            raw,
            opts,
            input_names=list(inputs),
            output_names=module.output_names,
            dynamic_axes=axes,
        )
        return shared.save(raw, Path(mf.graph_file(key, unet=True)).name)


def vae_upcast(pipe: Any, family: mf.ModelFamily, opts: ExportOptions) -> bool:
    """SDXL's VAE overflows in fp16 (``force_upcast``; diffusers' SDXL pipelines decode it in fp32), so
    an fp16 export keeps its decoder in fp32. SD pipelines ignore the flag, and so do we."""
    return opts.dtype == "fp16" and family.added_conditioning and bool(pipe.vae.config.get("force_upcast", False))


def text_encoder_keys(family: mf.ModelFamily) -> tuple[str, ...]:
    return (mf.TEXT_ENCODER, mf.TEXT_ENCODER_2) if family.added_conditioning else (mf.TEXT_ENCODER,)


def export_standard_parts(pipe: Any, root: Path, opts: ExportOptions, family: mf.ModelFamily) -> dict[str, int]:
    """Text encoder(s) and VAE decoder through optimum's exporter, in its folder layout.

    optimum works offline on an in-memory pipeline, so the parts that T-GATE leaves untouched get the
    same graphs (inputs ``input_ids`` / ``latent_sample``) that optimum's own SD/SDXL export produces.
    An upcast VAE decoder (see :func:`vae_upcast`) is exported on its own, from the fp32 VAE.
    """
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

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
