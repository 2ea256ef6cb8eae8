"""Graph variants as data: which attention kinds a UNet graph replays, which it captures, CFG or not.

A variant is what one exported graph computes; the step plan (:mod:`.plan`) says what each call
needs, and :func:`select` picks the variant that serves it (extra capture outputs are simply unread).
The exporter, the manifest, the sampler and every backend read these declarations instead of knowing
graph names. V1 is the two graphs it always was: ``unet_pregate`` and ``unet_postgate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..contract.errors import UsageError
from .plan import FULL, KINDS, MEAN, Step

SCHEDULES = ("v1", "v2")
PREGATE, POSTGATE = "unet_pregate", "unet_postgate"
CACHE_PREFIX = {"attn2": "cache", "attn1": "self"}  # tensor names: cache_00 (attn2, as in V1), self_00 (attn1)


@dataclass(frozen=True)
class GraphVariant:
    """One UNet graph: ``cfg`` (both CFG branches inside, guidance combined), the kinds it ``replay``s
    from cache inputs, and the ``(kind, layout)`` caches it outputs (``mean`` of the CFG halves or the
    ``full`` batch)."""

    key: str
    cfg: bool
    replay: frozenset[str] = field(default_factory=frozenset)
    capture: tuple[tuple[str, str], ...] = ()

    def serves(self, step: Step) -> bool:
        return self.cfg == step.cfg and self.replay == step.replay and set(step.capture) <= set(self.capture)

    @property
    def reads_text(self) -> bool:
        """Cross-attention computed: the graph takes the text states."""
        return "attn2" not in self.replay

    def to_dict(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "replay": sorted(self.replay), "capture": [list(c) for c in self.capture]}

    @classmethod
    def from_dict(cls, key: str, data: dict[str, Any]) -> GraphVariant:
        return cls(key, bool(data["cfg"]), frozenset(data["replay"]), tuple((k, lay) for k, lay in data["capture"]))


def variants_for(schedule: str, cfg: bool) -> tuple[GraphVariant, ...]:
    """The graphs a schedule needs for a family with (``cfg``) or without classifier-free guidance.

    V2 (self-attention cached too): before the gate, a full graph that outputs its attn1 outputs and one
    that replays them; the gate step's graph outputs both kinds (CFG mean); after it, attn2 replays with
    attn1 computed (and output, for ``fi_interval > 1``) or replayed. Guidance-free families keep the
    batch, so their captures are ``full`` throughout.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    at_gate = MEAN if cfg else FULL
    r1, r2, r12 = frozenset({"attn1"}), frozenset({"attn2"}), frozenset(KINDS)
    post = (GraphVariant("unet_post_r2_c1", False, r2, (("attn1", FULL),)), GraphVariant("unet_post_r12", False, r12))
    if schedule == "v1":
        return GraphVariant(PREGATE, cfg, capture=(("attn2", at_gate),)), GraphVariant(POSTGATE, False, r2)
    return (
        GraphVariant("unet_c1", cfg, capture=(("attn1", FULL),)),
        GraphVariant("unet_r1", cfg, r1),
        GraphVariant("unet_gate", cfg, capture=(("attn1", at_gate), ("attn2", at_gate))),
        *post,
    )


def schedule_of(params: Any) -> str:
    """The smallest schedule whose variants serve ``params``: V1 when self-attention is never cached."""
    v1 = params.sp_interval == 1 and params.fi_interval == 1 and params.warm_up == 0
    return "v1" if v1 else "v2"


def select(variants: tuple[GraphVariant, ...] | list[GraphVariant], step: Step) -> GraphVariant:
    """The variant serving ``step`` with the fewest extra outputs; a UsageError names what is missing."""
    fits = [v for v in variants if v.serves(step)]
    if not fits:
        raise UsageError(
            f"step {step.index} needs a graph '{step.variant}' that this export doesn't have "
            f"({', '.join(v.key for v in variants)}): re-export with --schedule v2 for self-attention caching"
        )
    return min(fits, key=lambda v: len(v.capture))


def source_of(variants: Sequence[GraphVariant], variant: GraphVariant, kind: str) -> GraphVariant:
    """A variant whose ``kind`` captures ``variant`` can replay (to build example or validation inputs):
    the whole CFG batch for a CFG graph; batch ``B`` (the CFG mean, or a guidance-free capture) otherwise."""
    for v in variants:
        layout = dict(v.capture).get(kind)
        if not v.replay and ((layout == FULL and v.cfg == variant.cfg) or (layout == MEAN and not variant.cfg)):
            return v
    raise UsageError(f"no variant captures {kind} caches that {variant.key} can replay")


def cache_tensor(kind: str, index: int) -> str:
    """Name of the ``index``-th cache tensor of ``kind`` (``cache_00`` for attn2, ``self_00`` for attn1)."""
    return f"{CACHE_PREFIX[kind]}_{index:02d}"
