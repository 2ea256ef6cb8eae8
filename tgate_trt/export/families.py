"""Model families beyond SD-1.5: SD-2.1, SDXL and guidance-free (LCM) models.

The family decides the UNet graphs' interface (which text states, SDXL's added conditioning, a
guidance embedding, CFG or not), so it is detected once here from the loaded pipeline and recorded in
the manifest; later stages read it from there. Architectures are kept as configs (as in ``models``) so
``--random-weights`` and the ``tiny-*`` variants need no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import manifest as mf

# --- architecture configs -----------------------------------------------------------------------------
_SCHEDULER_EULER_XL = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
_SCHEDULER_LCM = {
    "_class_name": "LCMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
}
_UNET_SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],  # 70 attn2 in all
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,  # CLIP-L 768 + OpenCLIP-bigG 1280, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids * 256 + pooled 1280
    "norm_num_groups": 32,
}
_TINY_UNET_SDXL = {
    **_UNET_SDXL,
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 1, 2],  # 11 attn2: multi-layer transformers as in SDXL
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 16,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


def _tiny_text(hidden: int, layers: int = 2, act: str = "quick_gelu") -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "projection_dim": 32,
        "hidden_act": act,
    }


def more_architectures(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The families' presets, derived from the SD-1.5 configs in ``models.ARCHITECTURES`` (``base``).

    ``pipeline`` picks the diffusers class; ``pad_token`` is "!" for OpenCLIP tokenizers (SD-2.x and
    SDXL's second), as in the released models.
    """
    sd15, tiny = base["sd15"], base["tiny"]
    vae_xl = {**sd15["vae"], "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
    tiny_vae_xl = {**tiny["vae"], "scaling_factor": 0.13025, "force_upcast": True}
    sdxl = {
        "pipeline": "sdxl",
        "unet": _UNET_SDXL,
        "vae": vae_xl,
        "text_encoder": CLIP_L,
        "text_encoder_2": {**_CLIP_BIGG, "pad_token": "!"},
        "scheduler": _SCHEDULER_EULER_XL,
    }
    tiny_sdxl = {
        "pipeline": "sdxl",
        "unet": _TINY_UNET_SDXL,
        "vae": tiny_vae_xl,
        "text_encoder": _tiny_text(32),
        "text_encoder_2": {**_tiny_text(32, layers=3, act="gelu"), "pad_token": "!"},
        "scheduler": _SCHEDULER_EULER_XL,
    }
    return {
        "tiny-sd21": {
            # SD-2.1's shape at toy width: OpenCLIP-style encoder (gelu, wider than tiny's), linear
            # projections, per-block head counts, v-prediction.
            "pipeline": "sd",
            "unet": {
                **tiny["unet"],
                "cross_attention_dim": 48,
                "attention_head_dim": [2, 4],
                "use_linear_projection": True,
                "upcast_attention": True,
            },
            "vae": tiny["vae"],
            "text_encoder": {**_tiny_text(48, act="gelu"), "pad_token": "!"},
            "scheduler": {**tiny["scheduler"], "prediction_type": "v_prediction"},
        },
        "sdxl": sdxl,
        "tiny-sdxl": tiny_sdxl,
        "lcm-sd15": {
            "pipeline": "lcm",
            "unet": {**sd15["unet"], "time_cond_proj_dim": 256},
            "vae": sd15["vae"],
            "text_encoder": sd15["text_encoder"],
            "scheduler": _SCHEDULER_LCM,
        },
        "tiny-lcm": {
            "pipeline": "lcm",
            "unet": {**tiny["unet"], "time_cond_proj_dim": 32},
            "vae": tiny["vae"],
            "text_encoder": tiny["text_encoder"],
            "scheduler": _SCHEDULER_LCM,
        },
        "lcm-sdxl": {**sdxl, "unet": {**_UNET_SDXL, "time_cond_proj_dim": 256}, "scheduler": _SCHEDULER_LCM},
        "tiny-lcm-sdxl": {
            **tiny_sdxl,
            "unet": {**_TINY_UNET_SDXL, "time_cond_proj_dim": 32},
            "scheduler": _SCHEDULER_LCM,
        },
    }


HUB_PRESETS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "lcm-sd15": "SimianLuo/LCM_Dreamshaper_v7",
    "lcm-sdxl": "latent-consistency/lcm-sdxl",  # the distilled UNet; the rest is SDXL base
}
# Defaults per family: the authors' recipes (g=10 of 25 with CFG; LCM g=1..2 of 4) and each pipeline's
# own default guidance (for LCM it is the w-embedding's value, not a CFG weight).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {"steps": 25, "gate_step": 10, "guidance_scale": 7.5},
    "sdxl": {"steps": 25, "gate_step": 10, "guidance_scale": 5.0},
    "lcm": {"steps": 4, "gate_step": 2, "guidance_scale": 8.5},
    "lcm-sdxl": {"steps": 4, "gate_step": 1, "guidance_scale": 8.0},
}


# --- building from configs ------------------------------------------------------------------------------
def _tokenizer(pad_token: str | None) -> Any:
    import tempfile

    from transformers import CLIPTokenizer

    from .models import write_char_tokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_char_tokenizer(Path(tmp))
        return CLIPTokenizer(
            str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **kwargs
        )


def _text_encoder(cfg: dict[str, Any], tokenizer: Any, full_size: bool, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **{k: v for k, v in cfg.items() if k != "pad_token"},
        vocab_size=max(len(tokenizer), 49408 if full_size else 0),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def make_scheduler(config: dict[str, Any]) -> Any:
    """The scheduler class named by ``_class_name``, configured from the rest."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def build_pipeline(name: str, arch: dict[str, Any], seed: int) -> Any:
    """A pipeline of ``arch``'s family with seeded random weights; nothing is downloaded."""
    from diffusers import (
        AutoencoderKL,
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from .models import _perturb_constant_parameters, _seeded

    full_size = not name.startswith("tiny")
    kind = arch["pipeline"]
    tokenizer = _tokenizer(arch["text_encoder"].get("pad_token"))
    tokenizer_2 = _tokenizer(arch["text_encoder_2"].get("pad_token")) if kind == "sdxl" else None
    with _seeded(seed):
        unet = UNet2DConditionModel(**arch["unet"]).eval()
        vae = AutoencoderKL(**arch["vae"]).eval()
        text_encoder = _text_encoder(arch["text_encoder"], tokenizer, full_size, projection=False)
        modules = [unet, vae, text_encoder]
        if kind == "sdxl":
            text_encoder_2 = _text_encoder(arch["text_encoder_2"], tokenizer_2, full_size, projection=True)
            modules.append(text_encoder_2)
        for module in modules:
            _perturb_constant_parameters(module)
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    scheduler = make_scheduler(arch["scheduler"])
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler,
            add_watermarker=False,
        )  # fmt: skip
    else:
        cls = LatentConsistencyModelPipeline if kind == "lcm" else StableDiffusionPipeline
        pipe = cls(
            **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the family of a loaded pipeline ----------------------------------------------------------------------
def time_id_count(pipe: Any) -> int:
    """Number of SDXL micro-conditioning ids the UNet's added embedding was trained with."""
    unet = pipe.unet
    pooled = pipe.text_encoder_2.config.projection_dim
    return (unet.add_embedding.linear_1.in_features - pooled) // unet.config.addition_time_embed_dim


def detect_family(pipe: Any) -> mf.ModelFamily:
    """Read the family off a loaded pipeline; unsupported variants fail here, before any export work.

    Guidance-free means a guidance-embedded UNet (``time_cond_proj_dim``, LCM-distilled) or an LCM
    scheduler (LCM-LoRA fused into a base UNet, which is run at guidance <= 1).
    """
    from .models import ModelLoadError

    cfg = pipe.unet.config
    for key in ("class_embed_type", "encoder_hid_dim_type"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"UNets with {key}={cfg.get(key)!r} are not supported")
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ModelLoadError(f"UNets with addition_embed_type={added!r} are not supported (SDXL uses text_time)")
    sdxl = added == "text_time"
    if sdxl:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise ModelLoadError("an SDXL UNet needs text_encoder_2 (refiner-only pipelines are not supported)")
        if time_id_count(pipe) != 6:
            raise ModelLoadError(
                f"this SDXL UNet takes {time_id_count(pipe)} time ids; supported: 6 (original size, crop, "
                "target size), not the refiner's aesthetic-score variant"
            )
    embedding = cfg.get("time_cond_proj_dim")
    guidance_free = embedding is not None or type(pipe.scheduler).__name__ == "LCMScheduler"
    family = ("lcm-sdxl" if sdxl else "lcm") if guidance_free else ("sdxl" if sdxl else "sd")
    return mf.ModelFamily(
        family=family,
        cfg=not guidance_free,
        added_conditioning=sdxl,
        guidance_embedding=embedding,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
    )


def text_section(pipe: Any, family: mf.ModelFamily) -> dict[str, Any]:
    """The manifest's ``text``: tokenizers, and which output of each encoder graph the UNet reads.

    SD reads the last hidden state; SDXL the penultimate layer of both encoders, concatenated, plus the
    second encoder's projected pooled output (optimum names these ``hidden_states.<i>`` / ``text_embeds``).
    """
    text: dict[str, Any] = {
        "tokenizer": "tokenizer",
        "max_length": pipe.tokenizer.model_max_length,
        "hidden_size": pipe.text_encoder.config.hidden_size,
    }
    if not family.added_conditioning:
        return text
    encoders = []
    for graph, tok, enc in (
        (mf.TEXT_ENCODER, "tokenizer", pipe.text_encoder),
        (mf.TEXT_ENCODER_2, "tokenizer_2", pipe.text_encoder_2),
    ):
        entry = {"graph": graph, "tokenizer": tok, "output": f"hidden_states.{enc.config.num_hidden_layers - 1}"}
        encoders.append(entry)
    encoders[-1]["pooled"] = "text_embeds"
    return {
        **text,
        "hidden_size": pipe.unet.config.cross_attention_dim,
        "encoders": encoders,
        "pooled_size": pipe.text_encoder_2.config.projection_dim,
        "time_ids": time_id_count(pipe),
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    }


# --- hub loading -----------------------------------------------------------------------------------------
def load_pretrained(ref: str, local: bool, preset: str | None = None) -> Any:
    """SDXL / LCM pipelines from a folder or the hub (``lcm-sdxl``: the distilled UNet on SDXL base)."""
    import diffusers

    if preset == "lcm-sdxl":
        unet = diffusers.UNet2DConditionModel.from_pretrained(ref, local_files_only=local)
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            HUB_PRESETS["sdxl"], unet=unet, local_files_only=local, add_watermarker=False
        )
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        return pipe
    pipe = diffusers.DiffusionPipeline.from_pretrained(ref, local_files_only=local)
    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        pipe.watermark = None  # the watermark is post-processing outside the graphs
    elif getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def guidance_embedding(scale: torch.Tensor, batch: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """LCM's w-embedding of ``guidance_scale - 1`` (diffusers' ``get_guidance_scale_embedding``), traced
    into the graphs so ``guidance_scale`` stays a per-request scalar input."""
    w = (scale.to(torch.float32).reshape(1) - 1.0).expand(batch) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
