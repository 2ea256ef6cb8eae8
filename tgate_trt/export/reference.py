"""The PyTorch T-GATE reference pipeline: the ground truth the ONNX graphs and runtimes are held to.

It drives the same :class:`PreGateUNet` / :class:`PostGateUNet` modules that are exported, so a match
with the authors' ``tgate`` package here also vouches for what goes into the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..manifest import check_gate
from .tgate import PostGateUNet, PreGateUNet


@dataclass
class ReferenceOutput:
    latents: torch.Tensor  # final latents, before VAE scaling
    images: Any  # PIL images, or a [B, 3, H, W] tensor in [0, 1] for output_type="pt"
    pregate_calls: int
    postgate_calls: int


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
) -> ReferenceOutput:
    """Run T-GATE V1: CFG with cross-attention for ``gate_step`` steps, then cached attn2, no CFG."""
    check_gate(num_inference_steps, gate_step)
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    batch = 1 if isinstance(prompt, str) else len(prompt)
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, True, negative_prompt)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(
        batch,
        pipe.unet.config.in_channels,
        height,
        width,
        prompt_embeds.dtype,
        device,
        generator,
        latents,
    )
    extra = pipe.prepare_extra_step_kwargs(generator, eta)
    pre, post = PreGateUNet(pipe.unet), PostGateUNet(pipe.unet)
    scale = torch.tensor([guidance_scale], dtype=torch.float32, device=device)
    caches: tuple[torch.Tensor, ...] = ()
    counts = [0, 0]
    for i, t in enumerate(pipe.progress_bar(pipe.scheduler.timesteps)):
        x = pipe.scheduler.scale_model_input(latents, t)
        timestep = t.reshape(1).to(torch.float32)
        if i < gate_step:
            noise, *cache_list = pre(x, timestep, prompt_embeds, negative_embeds, scale)
            caches = tuple(cache_list)  # only the last CFG step's caches are ever replayed
            counts[0] += 1
        else:
            noise = post(x, timestep, *caches)
            counts[1] += 1
        latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    images = decode_latents(pipe, latents, output_type)
    return ReferenceOutput(latents, images, *counts)


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str = "pil") -> Any:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
