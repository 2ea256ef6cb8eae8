"""The bounds every entry point applies: CLI, Python API and Triton refuse the same values the same way.

Each check raises :class:`UsageError` naming the argument, the range and what to do, before any graph
runs. Numbers arriving from argparse, JSON or Triton tensors all pass through here.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from pathlib import Path
from typing import Any

from .errors import UsageError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; Triton's seed is INT64
MAX_STEPS = 1000  # the schedulers' training timesteps
GUIDANCE_MAX = 100.0  # beyond this CFG only saturates (1e38 overflows to a black image)
MAX_BATCH = 64  # images per call through the API and CLI (Triton has its own, smaller cap)
PIXEL_FACTOR = 4  # cap on pixels per image without a memory record: 4x the export's native size (2x per side)
MEMORY_FRACTION = 0.8  # of the machine's memory (cgroup-aware) one generation may plan on: the rest is slack
MEMORY_RESERVE = 2**30  # interpreter, torch, tokenizers, text encoder runs (tiny's pipeline: 0.44 GiB loaded)
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


def default_max_pixels(
    height: int, width: int, memory: dict[str, Any] | None = None, weights: int = 0, share: int = 1
) -> int:
    """The export's pixel cap: from its memory record on this machine where it has one, else the old rule,
    ``PIXEL_FACTOR`` times its native image size.

    Derived at load, not at export: the fit (``memory["fit"]``, peak bytes of a generation against pixels,
    measured by :mod:`tgate_trt.export.memory`) travels with the export, and the budget is the running
    machine's (cgroup-aware): ``MEMORY_FRACTION`` of its memory per ``share`` (model instances on the host),
    less the graphs' ``weights`` and ``MEMORY_RESERVE``. Never below ``height * width``: the export's own
    size, which it was validated at, stays allowed (the override lowers it)."""
    if not memory:
        return PIXEL_FACTOR * height * width
    budget = MEMORY_FRACTION * memory_limit() / max(share, 1) - weights - MEMORY_RESERVE
    return max(height * width, pixels_within(memory["fit"], budget))


def pixels_within(fit: dict[str, float], budget: float) -> int:
    """The largest pixel count ``P`` with ``a + b*P + c*P**2 <= budget`` (0 when not even one pixel fits)."""
    a, b, c = fit["a"], max(fit["b"], 0.0), max(fit["c"], 0.0)
    room = budget - a
    if room <= 0:
        return 0
    if c > 0:
        return int((-b + math.sqrt(b * b + 4 * c * room)) / (2 * c))
    return int(room / b) if b > 0 else 2**62  # a flat fit: memory sets no cap


@functools.cache
def memory_limit() -> int:
    """Bytes this process may use: physical memory, or less where a cgroup (v1 or v2) limits it (containers)."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    files = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: the limit of this cgroup and of every one above it
                parts = Path(path).parts[1:]
                files += [Path("/sys/fs/cgroup", *parts[:n], "memory.max") for n in range(1, len(parts) + 1)]
            elif "memory" in controllers.split(","):
                files.append(Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes"))
    except (OSError, ValueError):
        pass
    for file in files:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a page-rounded 2**63 (v1): no limit
            limit = min(limit, int(text))
    return limit


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
