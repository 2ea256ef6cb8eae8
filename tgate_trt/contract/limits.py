"""The bounds every entry point applies: CLI, Python API and Triton refuse the same values the same way.

Each check raises :class:`UsageError` naming the argument, the range and what to do, before any graph
runs. Numbers arriving from argparse, JSON or Triton tensors all pass through here.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import UsageError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; Triton's seed is INT64
MAX_STEPS = 1000  # the schedulers' training timesteps
GUIDANCE_MAX = 100.0  # beyond this CFG only saturates (1e38 overflows to a black image)
MAX_BATCH = 64  # images per call through the API and CLI (Triton has its own, smaller cap)
PIXEL_FACTOR = 4  # default cap on pixels per image: 4x the export's native size (2x per side)
MAX_THREADS = 1024  # intra-op threads: more is a typo, and each one is a real thread


def check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> int:
    """An integer (not a bool, not a float) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an integer, got {value!r}{hint}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be an integer {span}, got {value}{hint}")
    return value


def check_float(name: str, value: Any, low: float, high: float, hint: str = "") -> float:
    """A finite real number in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number, got {value!r}{hint}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise UsageError(f"{name} must be a finite number in {low:g}..{high:g}, got {value!r}{hint}")
    return value


def check_seed(seed: Any) -> int:
    return check_int("seed", seed, 0, SEED_MAX, " (seeds are 0..2**63-1)")


def check_steps(steps: Any, max_steps: int = MAX_STEPS, name: str = "num_inference_steps") -> int:
    return check_int(name, steps, 1, max_steps)


def check_gate(steps: int, gate_step: Any) -> int:
    """The gate rule every stage applies: a cache needs at least one full step before it."""
    return check_int(
        "gate_step",
        gate_step,
        1,
        None,
        ": the cache comes from the last step before the gate; use gate_step >= steps for a plain run",
    )


def check_threads(threads: Any, name: str = "threads", hint: str = " (0: the backend's choice)") -> int:
    return check_int(name, threads, 0, MAX_THREADS, hint)


def check_guidance(guidance: Any) -> float:
    return check_float("guidance_scale", guidance, 0.0, GUIDANCE_MAX)


def check_batch(batch: Any, max_batch: int = MAX_BATCH) -> int:
    return check_int("batch (number of prompts)", batch, 1, max_batch)


def default_max_pixels(height: int, width: int) -> int:
    """The export's pixel cap: ``PIXEL_FACTOR`` times its native image size."""
    return PIXEL_FACTOR * height * width


def check_size(height: Any, width: Any, multiple: int, max_pixels: int) -> tuple[int, int]:
    """Image size: positive multiples of what the graphs take, within the pixel cap (memory budget)."""
    height = check_int("height", height, 1)
    width = check_int("width", width, 1)
    if height % multiple or width % multiple:
        raise UsageError(
            f"height and width must be positive multiples of {multiple} for this export, got {height}x{width}"
        )
    if height * width > max_pixels:
        raise UsageError(
            f"{height}x{width} is {height * width:,} pixels, over this export's cap of {max_pixels:,} "
            "(a memory budget): choose a smaller size, or raise the cap with --max-pixels / max_pixels="
        )
    return height, width
