"""``--model file.safetensors|.ckpt``: an original-layout Stable Diffusion checkpoint loads offline."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ldm_checkpoint import ldm_state_dict, save_ldm_checkpoint

from tgate_trt.families import ARCHITECTURES, ModelLoadError, resolve_model

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub and no network: HF_HUB_OFFLINE=1, an empty hub cache, and sockets that refuse to connect."""
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub and transformers read the variable once, at import: set what they read too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("this test must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)


@pytest.fixture
def config_folder(tiny_pipe, tmp_path: Path) -> Path:
    tiny_pipe.save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg"


def _save(pipe, path: Path) -> Path:
    if path.suffix == ".ckpt":  # the CompVis training format: a pickled {"state_dict": ...}
        torch.save({"state_dict": ldm_state_dict(pipe)}, path)
        return path
    return save_ldm_checkpoint(pipe, path)


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_every_weight_offline(offline, tiny_pipe, config_folder, tmp_path, suffix) -> None:
    ckpt = _save(tiny_pipe, tmp_path / f"model{suffix}")
    loaded = resolve_model(str(ckpt), config=str(config_folder))

    assert loaded.source["kind"] == "single_file"
    for name in COMPONENTS:
        want, got = getattr(tiny_pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert set(got) == set(want), name
        unequal = [key for key in want if not torch.equal(got[key], want[key])]
        assert not unequal, f"{name}: {unequal[:5]}"
    assert loaded.pipe.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()
    assert _public(loaded.pipe.scheduler.config) == _public(tiny_pipe.scheduler.config)


def test_checkpoint_has_the_sd15_layout() -> None:
    """SD-1.5's own key names (as in v1-5-pruned-emaonly), and diffusers converts every one back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = ARCHITECTURES["sd15"]
    with torch.device("meta"):  # names and shapes only: no 1 GB of weights
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(**arch["unet"]),
            vae=AutoencoderKL(**arch["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"], vocab_size=49408)),
        )
    ckpt = ldm_state_dict(pipe)
    for key, shape in {
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }.items():
        assert tuple(ckpt[key].shape) == shape, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ckpt

    for name, convert in [
        ("unet", lambda: convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config))),
        ("vae", lambda: convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config))),
        ("text_encoder", lambda: convert_ldm_clip_checkpoint(ckpt)),
    ]:
        back, want = convert(), getattr(pipe, name).state_dict()
        assert set(back) == set(want), name
        assert all(back[key].shape == want[key].shape for key in want), name


def test_wrong_suffix(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"\.safetensors"):
        resolve_model(str(weights))


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "x.safetensors"))


def test_no_config_offline(offline, tiny_pipe, tmp_path: Path) -> None:
    ckpt = save_ldm_checkpoint(tiny_pipe, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="--config"):
        resolve_model(str(ckpt))


def test_checkpoint_without_text_encoder(offline, tiny_pipe, config_folder, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = {k: v for k, v in ldm_state_dict(tiny_pipe).items() if not k.startswith("cond_stage_model.")}
    save_file(weights, str(tmp_path / "unet_vae.safetensors"))
    with pytest.raises(ModelLoadError, match="CLIPTextModel"):
        resolve_model(str(tmp_path / "unet_vae.safetensors"), config=str(config_folder))


def test_checkpoint_missing_one_weight(offline, tiny_pipe, config_folder, tmp_path: Path) -> None:
    """diffusers leaves a weight the checkpoint lacks on the meta device; that must not pass silently."""
    from safetensors.torch import save_file

    weights = ldm_state_dict(tiny_pipe)
    del weights["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    save_file(weights, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match="text_encoder.text_model.final_layer_norm.weight"):
        resolve_model(str(tmp_path / "partial.safetensors"), config=str(config_folder))
