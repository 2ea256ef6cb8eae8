"""One declarative :class:`FamilySpec` per model family, and the registry every stage looks them up in.

A family is what decides the UNet graphs' interface: the guidance axis (CFG inside the graph, or
guidance-free), SDXL's added conditioning, which text encoders there are and which of their outputs the
denoiser reads. It also carries the family's run defaults, the scheduler its presets ship with, the
diffusers pipeline class they are built as and the authors' loop rules. The manifest records the
detected family as a :class:`~tgate_trt.manifest.ModelFamily` (:meth:`FamilySpec.record`); later stages
read it from there and look the spec up by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .. import manifest as mf
from ..contract.errors import UserError
from .schedulers import LCM_SCHEDULER, SD_SCHEDULER, SDXL_SCHEDULER


class ModelLoadError(UserError, ValueError):
    """The --model argument can't be turned into a supported pipeline; the message says what to pass instead."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: its graph (= pipeline attribute), its tokenizer and what the denoiser reads."""

    graph: str  # mf.TEXT_ENCODER / mf.TEXT_ENCODER_2, also the pipeline's attribute
    tokenizer: str  # the pipeline attribute and the export's folder
    hidden_state: Literal["last", "penultimate"]  # the hidden state the UNet's cross-attention reads
    pooled: bool = False  # its projected pooled output (``text_embeds``) feeds the added conditioning


@dataclass(frozen=True)
class FamilySpec:
    name: str  # the manifest's family name
    guidance: Literal["cfg", "free"]  # CFG inside the pre-gate graph, or guidance-free (LCM)
    added_conditioning: bool  # SDXL's text_embeds + time_ids
    text_encoders: tuple[TextEncoderSpec, ...]
    pipeline: str  # the diffusers pipeline class its presets are built as
    scheduler: Mapping[str, Any]  # the scheduler config its presets ship with
    defaults: Mapping[str, Any]  # the authors' recipe and the pipeline's own default guidance
    clamp_warmup: bool  # the authors' loader clamps the loop's warm-up offset at 0 (SDXL's, not SD's)

    @property
    def cfg(self) -> bool:
        return self.guidance == "cfg"

    def record(self, guidance_embedding: int | None = None, prediction_type: str = "epsilon") -> mf.ModelFamily:
        """The manifest's record of a model of this family (the UNet's own facts passed in)."""
        return mf.ModelFamily(self.name, self.cfg, self.added_conditioning, guidance_embedding, prediction_type)


_CLIP = (TextEncoderSpec(mf.TEXT_ENCODER, "tokenizer", "last"),)
_CLIP_PAIR = (
    TextEncoderSpec(mf.TEXT_ENCODER, "tokenizer", "penultimate"),
    TextEncoderSpec(mf.TEXT_ENCODER_2, "tokenizer_2", "penultimate", pooled=True),
)


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# Defaults: the authors' recipes (g=10 of 25 with CFG; LCM g=1..2 of 4) and each pipeline's own default
# guidance (for LCM it is the w-embedding's value, not a CFG weight).
SD = FamilySpec(
    "sd", "cfg", False, _CLIP, "StableDiffusionPipeline", _frozen(SD_SCHEDULER),
    _frozen({"steps": 25, "gate_step": 10, "guidance_scale": 7.5}), clamp_warmup=False,
)  # fmt: skip
SDXL = FamilySpec(
    "sdxl", "cfg", True, _CLIP_PAIR, "StableDiffusionXLPipeline", _frozen(SDXL_SCHEDULER),
    _frozen({"steps": 25, "gate_step": 10, "guidance_scale": 5.0}), clamp_warmup=True,
)  # fmt: skip
LCM = FamilySpec(
    "lcm", "free", False, _CLIP, "LatentConsistencyModelPipeline", _frozen(LCM_SCHEDULER),
    _frozen({"steps": 4, "gate_step": 2, "guidance_scale": 8.5}), clamp_warmup=False,
)  # fmt: skip
LCM_SDXL = FamilySpec(
    "lcm-sdxl", "free", True, _CLIP_PAIR, "StableDiffusionXLPipeline", _frozen(LCM_SCHEDULER),
    _frozen({"steps": 4, "gate_step": 1, "guidance_scale": 8.0}), clamp_warmup=True,
)  # fmt: skip

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (SD, SDXL, LCM, LCM_SDXL)}
assert tuple(FAMILIES) == mf.FAMILIES, "the manifest's family names and the registry must agree"
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {name: dict(s.defaults) for name, s in FAMILIES.items()}


def family_spec(family: str | mf.ModelFamily) -> FamilySpec:
    """The spec of a family name or of a manifest's record."""
    name = family.family if isinstance(family, mf.ModelFamily) else family
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def spec_for(added_conditioning: bool, cfg: bool) -> FamilySpec:
    """The family with this added conditioning and guidance axis."""
    (spec,) = (s for s in FAMILIES.values() if s.added_conditioning == added_conditioning and s.cfg == cfg)
    return spec
