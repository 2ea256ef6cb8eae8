"""The one denoising loop: follow the step plan, run the variant each step needs, hand caches over.

The PyTorch reference (modules) and the runtime (ONNX Runtime, OpenVINO, TensorRT engines) differ only
in how a variant runs and how tensors cross to the scheduler, which the caller's :class:`Runner` says.
Caches stay the backend's own objects from the call that captured them to the calls that replay them,
so no backend copies them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .. import manifest as mf
from .plan import Step
from .variants import GraphVariant, select


class Runner(Protocol):
    """How one backend runs a variant: named inputs in, named outputs out (backend tensors)."""

    def __call__(self, variant: GraphVariant, feeds: dict[str, Any]) -> dict[str, Any]: ...

    def sample(self, variant: GraphVariant, x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The per-step inputs (sample, timestep) in the backend's form."""
        ...

    def noise(self, value: Any) -> torch.Tensor:
        """The noise prediction as a float32 torch tensor for the scheduler."""
        ...


def denoise(
    steps: Sequence[Step],
    variants: Sequence[GraphVariant],
    sites: dict[str, list[str]],
    runner: Runner,
    conditioning: Callable[[GraphVariant], dict[str, Any]],
    scheduler: Any,
    latents: torch.Tensor,
    step_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, GraphVariant, float], None] | None = None,
) -> torch.Tensor:
    """Run ``steps`` (one per scheduler timestep) and return the final latents.

    ``sites``: cache tensor names per attention kind, in graph order; ``conditioning(variant)``: the
    variant's conditioning inputs (computed once per run by the caller); ``progress(i, variant, seconds)``
    after each step.
    """
    import time

    caches: dict[str, dict[str, Any]] = {}  # kind -> tensor name -> the capturing call's output
    timesteps = scheduler.timesteps
    if len(timesteps) != len(steps):
        raise RuntimeError(f"the plan has {len(steps)} calls for {len(timesteps)} timesteps")
    kwargs = step_kwargs or {}
    for i, (step, t) in enumerate(zip(steps, timesteps, strict=True)):
        start = time.perf_counter()
        variant = select(variants, step)
        feeds = {**runner.sample(variant, scheduler.scale_model_input(latents, t), t), **conditioning(variant)}
        for kind in sorted(variant.replay):
            feeds.update(caches[kind])
        out = runner(variant, feeds)
        for kind, _ in step.capture:
            caches[kind] = {name: out[name] for name in sites[kind]}
        noise = runner.noise(out[mf.NOISE_PRED])
        latents = scheduler.step(noise, t, latents, **kwargs, return_dict=False)[0]
        if progress:
            progress(i, variant, time.perf_counter() - start)
    return latents
