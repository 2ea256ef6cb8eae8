"""The PyTorch T-GATE reference pipeline: the ground truth the ONNX graphs and runtimes are held to.

It drives the same :class:`VariantUNet` modules that are exported, through the same sampler loop the
runtime uses, so a match with the authors' ``tgate`` package here also vouches for what goes into the
graphs and for the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import manifest as mf
from ..families import detect_family
from ..manifest import check_gate
from ..methods.plan import KINDS, Step, TGateParams, family_plan
from ..methods.sampler import denoise
from ..methods.variants import PREGATE, GraphVariant, cache_tensor, schedule_of, variants_for
from .tgate import VariantUNet, attention_modules, remove_tgate


@dataclass
class ReferenceOutput:
    latents: torch.Tensor  # final latents, before VAE scaling
    images: Any  # PIL images, or a [B, 3, H, W] tensor in [0, 1] for output_type="pt"
    calls: dict[str, int]  # UNet calls per graph variant
    steps: list[Step]  # the plan that ran

    @property
    def pregate_calls(self) -> int:
        """Calls with CFG (before the gate)."""
        return sum(s.cfg for s in self.steps) if any(s.cfg for s in self.steps) else self.calls.get(PREGATE, 0)

    @property
    def postgate_calls(self) -> int:
        """Calls that replay cross-attention (after the gate)."""
        return sum("attn2" in s.replay for s in self.steps)


class _TorchRunner:
    """The sampler's runner for the PyTorch variant modules (the ones that are exported)."""

    def __init__(self, modules: dict[str, VariantUNet]) -> None:
        self.modules = modules
        self.calls = dict.fromkeys(modules, 0)

    def __call__(self, variant: GraphVariant, feeds: dict[str, Any]) -> dict[str, Any]:
        module = self.modules[variant.key]
        out = module(**feeds)
        self.calls[variant.key] += 1
        return dict(zip(module.output_names, out if isinstance(out, tuple) else (out,), strict=True))

    def sample(self, variant: GraphVariant, x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        return {mf.SAMPLE: x, mf.TIMESTEP: t.reshape(1).to(torch.float32)}

    def noise(self, value: Any) -> torch.Tensor:
        return value


@torch.no_grad()
def encode_conditioning(
    pipe: Any,
    family: mf.ModelFamily,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None,
    guidance_scale: float,
    height: int,
    width: int,
) -> dict[str, torch.Tensor]:
    """Every conditioning input of the two UNet graphs, named as in the graphs, via diffusers' own
    ``encode_prompt`` (so SDXL's zeroed empty negative and penultimate-layer states come for free)."""
    device = pipe._execution_device
    out = {mf.GUIDANCE_SCALE: torch.tensor([guidance_scale], dtype=torch.float32, device=device)}
    if family.added_conditioning:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=family.cfg,
            negative_prompt=negative_prompt,
        )
        ids = pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).repeat(embeds.shape[0], 1)
        out.update({mf.TEXT_EMBEDS: pooled, mf.TIME_IDS: ids, mf.NEGATIVE_TIME_IDS: ids})
        out[mf.NEGATIVE_TEXT_EMBEDS] = negative_pooled
    else:
        embeds, negative = pipe.encode_prompt(prompt, device, 1, family.cfg, negative_prompt)
    out.update({mf.PROMPT_EMBEDS: embeds, mf.NEGATIVE_PROMPT_EMBEDS: negative})
    return {k: v for k, v in out.items() if v is not None}


@torch.no_grad()
def tgate_reference(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 25,
    gate_step: int = 10,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    family: mf.ModelFamily | None = None,
    params: TGateParams | None = None,
) -> ReferenceOutput:
    """Run T-GATE through the same variant modules that are exported, on the one sampler loop.

    ``params`` (default V1 at ``gate_step``) may be V2's: self-attention cached and replayed on the
    authors' schedule too. ``family`` defaults to the one the pipeline implies (detected here, once).
    """
    params = params or TGateParams.v1(gate_step)
    check_gate(num_inference_steps, params.gate_step)
    family = family or detect_family(pipe)
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    batch = 1 if isinstance(prompt, str) else len(prompt)
    feeds = encode_conditioning(pipe, family, prompt, negative_prompt, guidance_scale, height, width)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    dtype = feeds[mf.PROMPT_EMBEDS].dtype
    channels = pipe.unet.config.in_channels
    latents = pipe.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)
    variants = variants_for(schedule_of(params), family.cfg)
    modules = {v.key: VariantUNet(pipe.unet, v, family) for v in variants}
    sites = {kind: [cache_tensor(kind, i) for i in range(len(attention_modules(pipe.unet, kind)))] for kind in KINDS}
    runner = _TorchRunner(modules)
    steps = family_plan(num_inference_steps, params, family, pipe.scheduler.order, len(pipe.scheduler.timesteps))
    try:
        latents = denoise(
            steps,
            variants,
            sites,
            runner,
            lambda v: {n: feeds[n] for n in modules[v.key].conditioning},
            pipe.scheduler,
            latents,
            pipe.prepare_extra_step_kwargs(generator, eta),
        )
    finally:
        remove_tgate(pipe.unet)
    return ReferenceOutput(latents, decode_latents(pipe, latents, output_type), runner.calls, steps)


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str = "pil") -> Any:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
