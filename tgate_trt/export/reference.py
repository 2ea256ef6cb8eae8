"""The PyTorch T-GATE reference pipeline: the ground truth the ONNX graphs and runtimes are held to.

It drives the same :class:`PreGateUNet` / :class:`PostGateUNet` modules that are exported, so a match
with the authors' ``tgate`` package here also vouches for what goes into the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import manifest as mf
from ..contract.errors import UsageError
from ..manifest import check_gate
from ..methods.plan import KINDS, MEAN, Step, TGateParams, family_plan
from .families import detect_family
from .tgate import PostGateUNet, PreGateUNet, install_tgate, remove_tgate


@dataclass
class ReferenceOutput:
    latents: torch.Tensor  # final latents, before VAE scaling
    images: Any  # PIL images, or a [B, 3, H, W] tensor in [0, 1] for output_type="pt"
    pregate_calls: int
    postgate_calls: int


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
) -> ReferenceOutput:
    """Run T-GATE V1: cross-attention (CFG when the family has it) for ``gate_step`` steps, then the
    cached attn2 outputs with no CFG. ``family`` defaults to the one the pipeline implies."""
    check_gate(num_inference_steps, gate_step)
    family = family or detect_family(pipe)
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    batch = 1 if isinstance(prompt, str) else len(prompt)
    feeds = encode_conditioning(pipe, family, prompt, negative_prompt, guidance_scale, height, width)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(
        batch,
        pipe.unet.config.in_channels,
        height,
        width,
        feeds[mf.PROMPT_EMBEDS].dtype,
        device,
        generator,
        latents,
    )
    extra = pipe.prepare_extra_step_kwargs(generator, eta)
    pre, post = PreGateUNet(pipe.unet, family), PostGateUNet(pipe.unet, family)
    pre_feeds = {n: feeds[n] for n in mf.conditioning_inputs(family, postgate=False)}
    post_feeds = {n: feeds[n] for n in mf.conditioning_inputs(family, postgate=True)}
    caches: dict[str, torch.Tensor] = {}
    counts = [0, 0]
    timesteps = pipe.scheduler.timesteps
    steps = family_plan(num_inference_steps, TGateParams.v1(gate_step), family, pipe.scheduler.order, len(timesteps))
    for step, t in zip(steps, pipe.progress_bar(timesteps), strict=True):
        x = pipe.scheduler.scale_model_input(latents, t)
        timestep = t.reshape(1).to(torch.float32)
        if "attn2" not in step.replay:
            noise, *cache_list = pre(x, timestep, **pre_feeds)
            if step.capture:  # the gate step: its caches are the ones replayed
                caches = {mf.cache_name(j): c for j, c in enumerate(cache_list)}
            counts[0] += 1
        else:
            noise = post(x, timestep, **post_feeds, **caches)
            counts[1] += 1
        latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    images = decode_latents(pipe, latents, output_type)
    return ReferenceOutput(latents, images, *counts)


@torch.no_grad()
def plan_reference(
    pipe: Any,
    prompt: str | list[str],
    params: TGateParams,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    output_type: str = "pil",
) -> tuple[ReferenceOutput, list[Step]]:
    """T-GATE with any parameters (V2: self-attention cached on a schedule too) on the plain UNet, its
    ``attn1`` and ``attn2`` processors set per call from the plan: the ground truth for graph variants.

    SD-1.x/2.x with CFG only, for now. As the authors' loop does, calls after the gate run batch ``B`` on
    the negative text states (their cross-attention replays, so the states are never read).
    """
    family = detect_family(pipe)
    if family.family != "sd" or not family.cfg:
        raise UsageError(f"the plan reference covers SD-1.x/2.x with CFG; this pipeline is {family.family}")
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = 1 if isinstance(prompt, str) else len(prompt)
    feeds = encode_conditioning(pipe, family, prompt, negative_prompt, guidance_scale, height, width)
    pipe.scheduler.set_timesteps(num_inference_steps, device=pipe._execution_device)
    timesteps = pipe.scheduler.timesteps
    embeds, negative = feeds[mf.PROMPT_EMBEDS], feeds[mf.NEGATIVE_PROMPT_EMBEDS]
    latents = pipe.prepare_latents(
        batch, pipe.unet.config.in_channels, height, width, embeds.dtype, pipe._execution_device, generator
    )
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    states = {kind: install_tgate(pipe.unet, kind)[0] for kind in KINDS}
    steps = family_plan(num_inference_steps, params, family, pipe.scheduler.order, len(timesteps))
    counts = [0, 0]
    try:
        for step, t in zip(steps, timesteps, strict=True):
            captures = dict(step.capture)
            for kind, state in states.items():
                if kind in step.replay:
                    state.mode = "replay"
                elif kind in captures:  # a fresh cache: later replays read this step's outputs
                    state.mode, state.cfg, state.cache, state.order = "capture", captures[kind] == MEAN, {}, []
                else:
                    state.mode = "compute"
            x = torch.cat([latents, latents]) if step.cfg else latents
            text = torch.cat([negative, embeds]) if step.cfg else negative
            x = pipe.scheduler.scale_model_input(x, t)
            noise = pipe.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            if step.cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            counts["attn2" in step.replay] += 1
            latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    finally:
        remove_tgate(pipe.unet)
    return ReferenceOutput(latents, decode_latents(pipe, latents, output_type), *counts), steps


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str = "pil") -> Any:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
