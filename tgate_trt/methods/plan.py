"""The T-GATE step plan: for every UNet call, CFG on or off, which attention kinds replay a cache and which
capture one (the whole batch, or the mean of the CFG halves). Pure and model-free.

It follows the authors' package (``tgate`` 1.0.0) exactly: ``tgate_scheduler``'s per-step flags, refreshed
only where its loop refreshes them (``i == n - 1 or (i + 1 > warmup and (i + 1) % order == 0)``, so a
second-order scheduler keeps the previous flags for its intermediate calls), CFG while ``i - warmup <
gate_step``, and its cache rules: computing without capturing clears a kind's cache, and a replay with no
cache computes instead. Captures no later step replays are dropped (V1's attn1 captures, for instance), so
V1 (``sp = fi = 1, warm_up = 0``) comes out as the two graphs it always was. Graph variants and the sampler
read this plan instead of comparing ``i`` with the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import manifest as mf
from ..contract import limits
from ..contract.errors import UsageError
from ..families import family_spec

KINDS = ("attn1", "attn2")  # self-attention, cross-attention
FULL, MEAN = "full", "mean"  # cache layouts: the call's whole batch, or the mean of the CFG halves


@dataclass(frozen=True)
class TGateParams:
    """``gate_step``: cross-attention is cached at ``gate_step - 1`` and replayed after; ``sp_interval`` /
    ``fi_interval``: self-attention is recomputed every that many steps before / after the gate (1: always);
    ``warm_up``: steps before self-attention caching starts. V1 is ``sp = fi = 1, warm_up = 0``."""

    gate_step: int
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 0

    def __post_init__(self) -> None:
        limits.check_gate(0, self.gate_step)
        hint = " (1 recomputes self-attention every step)"
        limits.check_int("sp_interval", self.sp_interval, 1, limits.MAX_STEPS, hint)
        limits.check_int("fi_interval", self.fi_interval, 1, limits.MAX_STEPS, hint)
        limits.check_int("warm_up", self.warm_up, 0, limits.MAX_STEPS)

    @classmethod
    def v1(cls, gate_step: int) -> TGateParams:
        return cls(gate_step, 1, 1, 0)

    @classmethod
    def v2(cls, gate_step: int = 10, sp_interval: int = 5, fi_interval: int = 1, warm_up: int = 2) -> TGateParams:
        """The authors' defaults."""
        return cls(gate_step, sp_interval, fi_interval, warm_up)


@dataclass(frozen=True)
class Step:
    index: int  # UNet call index (timestep index of the scheduler)
    cfg: bool  # both CFG branches in one batch, combined with the guidance scale
    replay: frozenset[str] = field(default_factory=frozenset)  # kinds whose outputs come from a cache
    capture: tuple[tuple[str, str], ...] = ()  # (kind, layout) the call must output for a later replay

    @property
    def variant(self) -> str:
        """The graph this call needs, by what it computes: e.g. ``cfg``, ``cfg-r1``, ``post-r2``, ``post-r1r2``;
        captures are extra outputs of the same graph (``+c2m``: attn2 mean, ``+c1f``: attn1 full batch)."""
        replays = "".join(k[-1] for k in KINDS if k in self.replay)
        name = ("cfg" if self.cfg else "post") + (f"-r{replays}" if replays else "")
        return name + "".join(f"+c{k[-1]}{layout[0]}" for k, layout in self.capture)


def _flags(c: int, p: TGateParams) -> tuple[dict[str, str], bool]:
    """Per kind ``compute`` / ``capture`` / ``replay`` at ``cur_step = c``, and whether captures keep the
    batch (``keep_shape``): the authors' ``tgate_scheduler``."""
    if c < p.gate_step - 1:
        if c < p.warm_up:
            attn1 = "compute"
        elif c == p.warm_up or c % p.sp_interval == 0:
            attn1 = "capture"
        else:
            attn1 = "replay"
        return {"attn1": attn1, "attn2": "compute"}, True
    if c == p.gate_step - 1:
        return {"attn1": "capture", "attn2": "capture"}, False
    return {"attn1": "capture" if c % p.fi_interval == 0 else "replay", "attn2": "replay"}, True


def plan(
    steps: int,
    params: TGateParams,
    cfg: bool = True,
    scheduler_order: int = 1,
    num_timesteps: int | None = None,
    clamp_warmup: bool = False,
) -> list[Step]:
    """One :class:`Step` per UNet call. ``cfg``: the family uses classifier-free guidance (False: guidance-
    free, captures keep the batch). ``num_timesteps``: the scheduler's timestep count (default ``steps *
    scheduler_order``); the difference is the loop's warm-up offset, clamped at 0 by the SDXL and PixArt
    loaders (``clamp_warmup``), not by the SD one."""
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    if scheduler_order < 1:
        raise UsageError(f"scheduler_order must be >= 1, got {scheduler_order}")
    n = steps * scheduler_order if num_timesteps is None else num_timesteps
    offset = n - steps * scheduler_order
    if clamp_warmup:
        offset = max(offset, 0)
    flags, keep = {"attn1": "compute", "attn2": "compute"}, True  # what the loader registers before the loop
    cached: dict[str, int | None] = {k: None for k in KINDS}  # step whose capture each kind's cache holds
    raw: list[tuple[bool, dict[str, str], bool]] = []
    for i in range(n):
        if i == n - 1 or (i + 1 > offset and (i + 1) % scheduler_order == 0):
            flags, keep = _flags(i - offset, params)
        on = cfg and i - offset < params.gate_step
        actions = {}
        for kind in KINDS:
            action = flags[kind]
            if action == "replay" and cached[kind] is None:
                action = "compute"  # the package computes when it has nothing to replay
            cached[kind] = i if action == "capture" else cached[kind] if action == "replay" else None
            actions[kind] = action
        raw.append((on, actions, keep))
    replayed = {
        (kind, _source(raw, i, kind))
        for i, (_, actions, _) in enumerate(raw)
        for kind in KINDS
        if actions[kind] == "replay"
    }
    out = []
    for i, (on, actions, keep) in enumerate(raw):
        replay = frozenset(k for k in KINDS if actions[k] == "replay")
        layout = MEAN if on and not keep else FULL
        capture = tuple((k, layout) for k in KINDS if actions[k] == "capture" and (k, i) in replayed)
        out.append(Step(i, on, replay, capture))
    return out


def family_plan(
    steps: int, params: TGateParams, family: mf.ModelFamily, scheduler_order: int = 1, num_timesteps: int | None = None
) -> list[Step]:
    """:func:`plan` with a model family's loop rules: CFG or guidance-free, and whether the family's loader
    clamps the warm-up offset (:attr:`~tgate_trt.families.FamilySpec.clamp_warmup`: SDXL's, not SD's)."""
    clamp = family_spec(family).clamp_warmup
    return plan(steps, params, family.cfg, scheduler_order, num_timesteps, clamp)


def _source(raw: list[tuple[bool, dict[str, str], bool]], i: int, kind: str) -> int:
    """The step whose capture a replay of ``kind`` at step ``i`` reads."""
    j = i - 1
    while raw[j][1][kind] != "capture":
        j -= 1
    return j


def counts(steps: list[Step]) -> dict[str, int]:
    """How many calls each variant gets: what the runtime's engine counters must show."""
    out: dict[str, int] = {}
    for step in steps:
        out[step.variant] = out.get(step.variant, 0) + 1
    return out
