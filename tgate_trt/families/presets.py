"""Presets: every preset's architecture as plain configs, and where the released weights live.

Model weights can't always be downloaded (air-gapped build hosts, CI), so ``--random-weights`` builds a
preset's architecture with seeded random weights and the ``tiny*`` presets are small seeded pipelines of
each family's shape for tests. Each architecture names its family (:mod:`.spec`); its scheduler is the
family's unless it says otherwise. ``pad_token`` is "!" for OpenCLIP tokenizers (SD-2.x and SDXL's
second), as in the released models.
"""

from __future__ import annotations

from typing import Any

from .spec import FAMILIES

# --- building blocks -----------------------------------------------------------------------------------
_VAE_SD = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
_TINY_VAE = {**_VAE_SD, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
_XL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}
_UNET_SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# SD-1.5 shape at toy width: VAE factor 8, cross-attention at two resolutions (7 attn2 layers).
_TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
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
_OPENCLIP_H = {  # SD-2.x's
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "pad_token": "!",
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


def _preset(family: str, **parts: Any) -> dict[str, Any]:
    """An architecture of ``family``: its parts' configs, the family's scheduler unless given."""
    return {"family": family, "scheduler": dict(FAMILIES[family].scheduler), **parts}


# --- the presets ------------------------------------------------------------------------------------------
_SD15 = _preset("sd", unet=_UNET_SD15, vae={**_VAE_SD, "sample_size": 512}, text_encoder=CLIP_L)
_TINY = _preset("sd", unet=_TINY_UNET, vae={**_TINY_VAE, "sample_size": 64}, text_encoder=_tiny_text(32))
_SDXL_PARTS = {
    "vae": {**_VAE_SD, **_XL_VAE, "sample_size": 1024},
    "text_encoder": CLIP_L,
    "text_encoder_2": _OPENCLIP_BIGG,
}
_TINY_SDXL_PARTS = {
    "vae": {**_TINY_VAE, **_XL_VAE, "sample_size": 64},
    "text_encoder": _tiny_text(32),
    "text_encoder_2": {**_tiny_text(32, layers=3, act="gelu"), "pad_token": "!"},
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": _SD15,
    "sd21": _preset(
        "sd",
        unet={
            **_UNET_SD15,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        vae={**_VAE_SD, "sample_size": 768},
        text_encoder=_OPENCLIP_H,
        scheduler={**FAMILIES["sd"].scheduler, "prediction_type": "v_prediction"},
    ),
    "tiny": _TINY,
    # SD-2.1's shape at toy width: OpenCLIP-style encoder (gelu, wider than tiny's), linear projections,
    # per-block head counts, v-prediction.
    "tiny-sd21": _preset(
        "sd",
        unet={
            **_TINY_UNET,
            "cross_attention_dim": 48,
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        vae=_TINY["vae"],
        text_encoder={**_tiny_text(48, act="gelu"), "pad_token": "!"},
        scheduler={**FAMILIES["sd"].scheduler, "prediction_type": "v_prediction"},
    ),
    "sdxl": _preset("sdxl", unet=_UNET_SDXL, **_SDXL_PARTS),
    "tiny-sdxl": _preset("sdxl", unet=_TINY_UNET_SDXL, **_TINY_SDXL_PARTS),
    "lcm-sd15": _preset("lcm", unet={**_UNET_SD15, "time_cond_proj_dim": 256}, vae=_SD15["vae"], text_encoder=CLIP_L),
    "tiny-lcm": _preset(
        "lcm", unet={**_TINY_UNET, "time_cond_proj_dim": 32}, vae=_TINY["vae"], text_encoder=_TINY["text_encoder"]
    ),
    "lcm-sdxl": _preset("lcm-sdxl", unet={**_UNET_SDXL, "time_cond_proj_dim": 256}, **_SDXL_PARTS),
    "tiny-lcm-sdxl": _preset("lcm-sdxl", unet={**_TINY_UNET_SDXL, "time_cond_proj_dim": 32}, **_TINY_SDXL_PARTS),
}
TINY_SEED = 0

# Hub presets loaded as whatever pipeline they hold (the SD ones load as StableDiffusionPipeline).
HUB_PRESETS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "lcm-sd15": "SimianLuo/LCM_Dreamshaper_v7",
    "lcm-sdxl": "latent-consistency/lcm-sdxl",  # the distilled UNet; the rest is SDXL base
}
# Every --model preset: a hub id, or None when built in-process (tiny*) or shipped in the package (shapes,
# trained by this project: tgate_trt/zoo/shapes).
PRESETS: dict[str, str | None] = {
    "tiny": None,
    "shapes": None,
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "tiny-sd21": None,
    "sdxl": HUB_PRESETS["sdxl"],
    "tiny-sdxl": None,
    "lcm-sd15": HUB_PRESETS["lcm-sd15"],
    "tiny-lcm": None,
    "lcm-sdxl": HUB_PRESETS["lcm-sdxl"],
    "tiny-lcm-sdxl": None,
}
