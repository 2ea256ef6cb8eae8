"""The one family detector, and what a loaded pipeline's family puts in the manifest's ``text`` section.

The family is read once, from the loaded pipeline, right after loading (unsupported variants fail here,
before any export work); every later function takes it as an argument, and the manifest records it.
"""

from __future__ import annotations

from typing import Any

from .. import manifest as mf
from .spec import ModelLoadError, family_spec, spec_for


def time_id_count(pipe: Any) -> int:
    """Number of SDXL micro-conditioning ids the UNet's added embedding was trained with."""
    unet = pipe.unet
    pooled = pipe.text_encoder_2.config.projection_dim
    return (unet.add_embedding.linear_1.in_features - pooled) // unet.config.addition_time_embed_dim


def detect_family(pipe: Any) -> mf.ModelFamily:
    """Read the family off a loaded pipeline; unsupported variants raise :class:`ModelLoadError`.

    Guidance-free means a guidance-embedded UNet (``time_cond_proj_dim``, LCM-distilled) or an LCM
    scheduler (LCM-LoRA fused into a base UNet, which is run at guidance <= 1). ``pipe`` may also be a bare
    UNet: its config alone then decides (no scheduler to read, so an LCM-LoRA reads as its base family, and
    the pipeline-level SDXL checks are skipped).
    """
    unet = getattr(pipe, "unet", pipe)
    whole = unet is not pipe
    cfg = unet.config
    for key in ("class_embed_type", "encoder_hid_dim_type"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"UNets with {key}={cfg.get(key)!r} are not supported")
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ModelLoadError(f"UNets with addition_embed_type={added!r} are not supported (SDXL uses text_time)")
    sdxl = added == "text_time"
    if sdxl and whole:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise ModelLoadError("an SDXL UNet needs text_encoder_2 (refiner-only pipelines are not supported)")
        if time_id_count(pipe) != 6:
            raise ModelLoadError(
                f"this SDXL UNet takes {time_id_count(pipe)} time ids; supported: 6 (original size, crop, "
                "target size), not the refiner's aesthetic-score variant"
            )
    scheduler = getattr(pipe, "scheduler", None) if whole else None
    embedding = cfg.get("time_cond_proj_dim")
    guidance_free = embedding is not None or type(scheduler).__name__ == "LCMScheduler"
    prediction = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else "epsilon"
    return spec_for(added_conditioning=sdxl, cfg=not guidance_free).record(embedding, prediction)


def text_section(pipe: Any, family: mf.ModelFamily) -> dict[str, Any]:
    """The manifest's ``text``: tokenizers, and which output of each encoder graph the UNet reads.

    SD reads its one encoder's last hidden state: nothing more to say. With added conditioning each encoder
    is listed with the hidden state its spec names (SDXL: the penultimate layer of both, concatenated) and
    the pooled output it feeds (SDXL's second encoder's projected ``text_embeds``); optimum names these
    ``hidden_states.<i>`` / ``text_embeds``.
    """
    spec = family_spec(family)
    text: dict[str, Any] = {
        "tokenizer": "tokenizer",
        "max_length": pipe.tokenizer.model_max_length,
        "hidden_size": pipe.text_encoder.config.hidden_size,
    }
    if not spec.added_conditioning:
        return text
    encoders = []
    for e in spec.text_encoders:
        layers = getattr(pipe, e.graph).config.num_hidden_layers
        index = layers - 1 if e.hidden_state == "penultimate" else layers
        entry = {"graph": e.graph, "tokenizer": e.tokenizer, "output": f"hidden_states.{index}"}
        encoders.append({**entry, "pooled": "text_embeds"} if e.pooled else entry)
    return {
        **text,
        "hidden_size": pipe.unet.config.cross_attention_dim,
        "encoders": encoders,
        "pooled_size": pipe.text_encoder_2.config.projection_dim,
        "time_ids": time_id_count(pipe),
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    }
