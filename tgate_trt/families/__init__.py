"""Model families: what each family is (:mod:`.spec`), its presets' architectures (:mod:`.presets`), the one
random-weight and tokenizer builder (:mod:`.build`), loading (:mod:`.load`), the one detector
(:mod:`.detect`), schedulers (:mod:`.schedulers`) and LCM's guidance embedding (:mod:`.guidance`).

Stage order: this package uses only the contract (``contract/``, ``manifest``); every later stage
(methods, export, engines, runtime, ...) may use it.
"""

from .build import build_from_architecture, build_tiny, clip_tokenizer, write_clip_tokenizer
from .detect import detect_family, text_section, time_id_count
from .guidance import guidance_embedding
from .load import (
    CHECKPOINT_SUFFIXES,
    SourceModel,
    apply_lcm_lora,
    check_diffusers_folder,
    resolve_model,
)
from .presets import ARCHITECTURES, HUB_PRESETS, PRESETS, TINY_SEED
from .schedulers import SCHEDULERS, SD_SCHEDULER, default_scheduler, make_scheduler
from .spec import FAMILIES, FAMILY_DEFAULTS, FamilySpec, ModelLoadError, TextEncoderSpec, family_spec, spec_for

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_SUFFIXES",
    "FAMILIES",
    "FAMILY_DEFAULTS",
    "HUB_PRESETS",
    "PRESETS",
    "SCHEDULERS",
    "SD_SCHEDULER",
    "TINY_SEED",
    "FamilySpec",
    "ModelLoadError",
    "SourceModel",
    "TextEncoderSpec",
    "apply_lcm_lora",
    "build_from_architecture",
    "build_tiny",
    "check_diffusers_folder",
    "clip_tokenizer",
    "default_scheduler",
    "detect_family",
    "family_spec",
    "guidance_embedding",
    "make_scheduler",
    "resolve_model",
    "spec_for",
    "text_section",
    "time_id_count",
    "write_clip_tokenizer",
]
