"""LCM-LoRA on SDXL: a LoRA file fused into the UNet at export makes a guidance-free (LCM) export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tgate_trt import manifest as mf
from tgate_trt.export.exporter import ExportError, ExportRequest, run_export
from tgate_trt.families import build_from_architecture
from tgate_trt.runtime.pipeline import TGatePipeline

pytest.importorskip("peft", reason="peft (dev / lora extra) loads LoRA weights")
PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SDXL pipeline folder and a LoRA for its UNet's attention projections (non-zero, seeded)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lcm-lora")
    pipe = build_from_architecture("tiny-sdxl")
    pipe.save_pretrained(root / "base")
    torch.manual_seed(5)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():  # gaussian init leaves B at zero: give it values so the LoRA changes the UNet
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet), weight_name="lcm_lora.safetensors"
    )
    return root / "base", root / "lora" / "lcm_lora.safetensors"


def _fused(base: Path, lora: Path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_lcm_lora_export_is_guidance_free_and_matches_authors(base_and_lora: tuple[Path, Path], tmp_path: Path) -> None:
    base, lora = base_and_lora
    manifest, checks = run_export(ExportRequest(str(base), tmp_path / "out", lcm_lora=str(lora)))
    assert all(c.passed for c in checks)
    assert (manifest.model.family, manifest.model.cfg) == ("lcm-sdxl", False)
    assert manifest.source["lcm_lora"]["sha256"] == mf.sha256_file(lora)
    assert mf.NEGATIVE_PROMPT_EMBEDS not in [t.name for t in manifest.graphs[mf.PREGATE].inputs]
    ours = TGatePipeline.from_export(tmp_path / "out")(PROMPTS, num_inference_steps=4, gate_step=2, seed=3)
    plain, _ = run_export(ExportRequest(str(base), tmp_path / "plain"))  # same base without the LoRA
    assert plain.model.family == "sdxl"
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    theirs = (
        tgate.TgateSDXLLoader(_fused(base, lora))
        .tgate(
            PROMPTS,
            gate_step=2,
            num_inference_steps=4,
            guidance_scale=1.0,
            sp_interval=1,
            fi_interval=1,
            warm_up=0,
            lcm=True,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        )  # fmt: skip
        .images
    )
    assert np.abs(ours.latents - theirs.numpy()).max() <= 1e-3
    unfused = _fused(base, lora)
    unfused.unet = build_from_architecture("tiny-sdxl").unet  # the base UNet: the LoRA must have changed it
    other = tgate.TgateSDXLLoader(unfused).tgate(
        PROMPTS, gate_step=2, num_inference_steps=4, guidance_scale=1.0, sp_interval=1, fi_interval=1,
        warm_up=0, lcm=True, generator=torch.Generator().manual_seed(3), output_type="latent",
    ).images  # fmt: skip
    assert np.abs(ours.latents - other.numpy()).max() > 1e-2


def test_lcm_lora_bad_file_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a .safetensors file"):
        run_export(ExportRequest("tiny-sdxl", tmp_path / "out", lcm_lora=str(tmp_path / "missing.bin")))
    assert not (tmp_path / "out").exists()
