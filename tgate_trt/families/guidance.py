"""Guidance-embedded families (LCM-distilled UNets): the w-embedding their UNet's time embedding takes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def guidance_embedding(scale: torch.Tensor, batch: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """LCM's w-embedding of ``guidance_scale - 1`` (diffusers' ``get_guidance_scale_embedding``), traced
    into the graphs so ``guidance_scale`` stays a per-request scalar input."""
    import torch

    w = (scale.to(torch.float32).reshape(1) - 1.0).expand(batch) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
