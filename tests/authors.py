"""The authors' ``tgate`` package as the oracle: their pipeline built fresh for every run (its loader
rewires the modules it is given and keeps caches across calls)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tgate_trt.methods.plan import TGateParams

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def tiny_pipe(name: str, scheduler: str | None = None) -> Any:
    """A tiny pipeline (``tiny`` or a ``tiny-*`` variant), its scheduler replaced by ``scheduler`` if given."""
    import diffusers

    from tgate_trt.families import build_from_architecture, build_tiny

    pipe = build_tiny() if name == "tiny" else build_from_architecture(name)
    if scheduler is not None:
        cls = getattr(diffusers, SCHEDULER_CLASSES[scheduler])
        extra = {"algorithm_type": "dpmsolver++"} if scheduler == "dpm++" else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def authors_latents(
    name: str,
    scheduler: str | None,
    prompt: list[str],
    negative: list[str] | None,
    steps: int,
    params: TGateParams,
    seed: int = 3,
    **kwargs: Any,
) -> torch.Tensor:
    """Final latents of the authors' ``pipe.tgate(...)`` with ``params`` (V1 or V2)."""
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    loader = tgate.TgateSDXLLoader if "sdxl" in name else tgate.TgateSDLoader
    return (
        loader(tiny_pipe(name, scheduler))
        .tgate(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            output_type="latent",
            gate_step=params.gate_step,
            sp_interval=params.sp_interval,
            fi_interval=params.fi_interval,
            warm_up=params.warm_up,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        .images
    )
