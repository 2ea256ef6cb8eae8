"""The PyTorch reference of each model family against diffusers (no gate) and the authors' ``tgate``
1.0.0 where it supports the model (``TgateSDLoader`` for SD-2.1, ``TgateSDXLLoader`` for SDXL and, with
``lcm=True``, for LCM-SDXL); the preset architectures' shapes, without building their weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tgate_trt import manifest as mf
from tgate_trt.export.reference import tgate_reference
from tgate_trt.export.tgate import cross_attention_modules
from tgate_trt.families import ARCHITECTURES, build_from_architecture, detect_family

PROMPTS = ["a red circle on the left", "a blue square"]
GUIDANCE = {"tiny-sd21": 7.5, "tiny-sdxl": 5.0, "tiny-lcm": 8.5, "tiny-lcm-sdxl": 8.0}


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ours(name: str, gate: int, steps: int, negative: list[str] | None = None) -> torch.Tensor:
    return tgate_reference(
        build_from_architecture(name),
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        gate_step=gate,
        guidance_scale=GUIDANCE[name],
        generator=_gen(),
        output_type="pt",
    ).latents


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_no_gate_is_the_diffusers_pipeline(name: str) -> None:
    """gate >= steps is the model's own diffusers pipeline (SD, SDXL, LatentConsistencyModelPipeline)."""
    steps = 4 if "lcm" in name else 8
    ours = _ours(name, steps, steps)
    theirs = build_from_architecture(name)(
        PROMPTS, num_inference_steps=steps, guidance_scale=GUIDANCE[name], generator=_gen(), output_type="latent"
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_gating_changes_the_result(name: str) -> None:
    steps = 4 if "lcm" in name else 8
    assert (_ours(name, 1, steps) - _ours(name, 2, steps)).abs().max().item() > 1e-3


def _authors(loader: str, name: str, gate: int, steps: int, **kwargs) -> torch.Tensor:
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    pipe = getattr(tgate, loader)(build_from_architecture(name))
    return pipe.tgate(
        PROMPTS,
        gate_step=gate,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE[name],
        sp_interval=1,
        fi_interval=1,
        warm_up=0,
        generator=_gen(),
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("gate", [3, 7])
def test_sd21_reference_equals_authors(gate: int) -> None:
    ours = _ours("tiny-sd21", gate, 10, negative=["", ""])
    theirs = _authors("TgateSDLoader", "tiny-sd21", gate, 10, negative_prompt=["", ""])
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("gate", "negative"), [(3, None), (7, None), (4, ["", "blurry, low quality"])])
def test_sdxl_reference_equals_authors(gate: int, negative: list[str] | None) -> None:
    """Including the negative branch's text_embeds/time_ids after the gate, and SDXL's zeroed empty
    negative prompt (``negative=None``); a real negative prompt makes the negative branch differ."""
    ours = _ours("tiny-sdxl", gate, 10, negative=negative)
    theirs = _authors("TgateSDXLLoader", "tiny-sdxl", gate, 10, negative_prompt=negative)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("gate", [1, 2])
def test_lcm_sdxl_reference_equals_authors_lcm_mode(gate: int) -> None:
    """The authors' LCM mode: no CFG, the cache is the attn2 output itself, batch unchanged."""
    ours = _ours("tiny-lcm-sdxl", gate, 4)
    theirs = _authors("TgateSDXLLoader", "tiny-lcm-sdxl", gate, 4, lcm=True)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("name", "attn2", "embedding"),
    [("sd21", 16, None), ("sdxl", 70, None), ("lcm-sd15", 16, 256), ("lcm-sdxl", 70, 256)],
)
def test_preset_architectures(name: str, attn2: int, embedding: int | None) -> None:
    """The configs behind --random-weights, built on the meta device (no memory, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[name]["unet"])
    assert len(cross_attention_modules(unet)) == attn2
    assert unet.config.time_cond_proj_dim == embedding
    if "sdxl" in name:
        assert unet.config.cross_attention_dim == 2048 and ARCHITECTURES[name]["vae"]["force_upcast"]
        assert unet.add_embedding.linear_1.in_features == 6 * 256 + 1280
    if name == "sd21":
        assert ARCHITECTURES[name]["scheduler"]["prediction_type"] == "v_prediction"
        assert unet.config.use_linear_projection and ARCHITECTURES[name]["text_encoder"]["hidden_size"] == 1024


def test_family_detection_and_graph_inputs() -> None:
    from diffusers import LCMScheduler

    pipe = build_from_architecture("tiny-sdxl")
    assert detect_family(pipe) == mf.ModelFamily("sdxl", True, True, None, "epsilon")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # LCM-LoRA: base UNet, LCM sampler
    lora = detect_family(pipe)
    assert (lora.family, lora.cfg, lora.guidance_embedding) == ("lcm-sdxl", False, None)
    assert mf.conditioning_inputs(lora, postgate=False) == [mf.PROMPT_EMBEDS, mf.TEXT_EMBEDS, mf.TIME_IDS]
    assert mf.conditioning_inputs(lora, postgate=True) == [mf.TEXT_EMBEDS, mf.TIME_IDS]
    sd = mf.ModelFamily()
    assert mf.conditioning_inputs(sd, postgate=True) == []
    assert mf.conditioning_inputs(sd, postgate=False) == [
        mf.PROMPT_EMBEDS,
        mf.NEGATIVE_PROMPT_EMBEDS,
        mf.GUIDANCE_SCALE,
    ]
    with pytest.raises(ValueError, match="guidance-free"):
        mf.ModelFamily("lcm", cfg=True, guidance_embedding=32)


def test_older_manifests_are_refused_with_a_remedy(tiny_export: Path) -> None:
    """Format 1 exports (no sha256 of tokenizer/scheduler, no pixel cap) are refused: re-export them."""
    data = json.loads((tiny_export / mf.MANIFEST_NAME).read_text())
    assert mf.Manifest.from_dict(data).model == mf.ModelFamily() and mf.Manifest.from_dict(data).encoder_batch(2) == 4
    with pytest.raises(mf.ManifestError, match="format_version 1 is not 2: re-export"):
        mf.Manifest.from_dict({**data, "format_version": 1})
