"""Write a diffusers Stable Diffusion pipeline as an original (LDM / CompVis) single-file checkpoint.

The inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_ldm_clip_checkpoint``: keys get the layout of ``v1-5-pruned-emaonly.safetensors``
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), so tests can
exercise ``from_single_file`` without downloading a real checkpoint. The layout follows the configs
(block counts, ``layers_per_block``), so the tiny pipeline and SD-1.5 are both covered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# Inside a residual block: diffusers name -> LDM name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# Inside the VAE's mid-block attention; q/k/v/proj_out are 1x1 convolutions in LDM, linears in diffusers.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, blocks: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Swap the block prefix of ``key`` for its LDM one, then the module name inside that block."""
    for prefix, (ldm_prefix, inner) in blocks.items():
        if key.startswith(prefix):
            module, _, param = key[len(prefix) :].rpartition(".")
            return ldm_prefix + (inner.get(module, module) + "." if module else "") + param
    raise KeyError(f"no LDM name for {key!r}")


def unet_key_map(config: Any) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers UNet2DConditionModel prefixes -> (``openaimodel.UNetModel`` prefix, inner renames)."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    blocks: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    for i in range(levels):
        # input_blocks: conv_in, then per level `per` x (resnet[, attention]) and a downsampler if not last.
        first = 1 + i * (per + 1)
        for j in range(per):
            blocks[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{first + j}.0.", _UNET_RESNET)
            blocks[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{first + j}.1.", {})
        blocks[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{first + per}.0.op.", {})
        # output_blocks: per level `per + 1` x (resnet[, attention][, upsampler on the last one]).
        first = i * (per + 1)
        for j in range(per + 1):
            blocks[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{first + j}.0.", _UNET_RESNET)
            blocks[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{first + j}.1.", {})
        upsampler = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        blocks[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{first + per}.{upsampler}.conv.", {})
    return blocks


def vae_key_map(config: Any) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers AutoencoderKL prefixes -> (LDM ``Encoder``/``Decoder`` prefix, inner renames)."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    blocks: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        blocks[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        blocks[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        blocks[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        blocks[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(per):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        # The decoder numbers its levels from the full-resolution end: up_blocks.0 is LDM's up.{levels-1}.
        up = f"decoder.up.{levels - 1 - i}."
        for j in range(per + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"{up}block.{j}.", _VAE_RESNET)
        blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"{up}upsample.conv.", {})
    return blocks


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder weights under original Stable Diffusion key names."""
    out: dict[str, torch.Tensor] = {}
    unet_blocks = unet_key_map(pipe.unet.config)
    for key, value in pipe.unet.state_dict().items():
        out[UNET_PREFIX + _rename(key, unet_blocks)] = value
    vae_blocks = vae_key_map(pipe.vae.config)
    for key, value in pipe.vae.state_dict().items():
        ldm_key = _rename(key, vae_blocks)
        if ".mid.attn_1." in ldm_key and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv
        out[VAE_PREFIX + ldm_key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out[TEXT_PREFIX + key] = value
    if len(out) != sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)):
        raise AssertionError("two weights were given the same LDM name")
    return out


def save_ldm_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Save ``pipe``'s weights as an original-layout Stable Diffusion ``.safetensors`` file."""
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in ldm_state_dict(pipe).items()}, str(path))
    return path
