"""Where a Stable Diffusion pipeline comes from: presets, local folders, single files, or random weights.

Model weights can't always be downloaded (air-gapped build hosts, CI), so every preset's architecture
is kept here as plain configs: ``--random-weights`` builds SD-1.5/2.1-sized graphs for measurement with
no network, and ``tiny`` is a seeded SD-1.5-shaped pipeline small enough for tests.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..contract.errors import UserError
from .families import CLIP_L, HUB_PRESETS, build_pipeline, load_pretrained, more_architectures

PRESETS: dict[str, str | None] = {
    "tiny": None,  # built in-process
    "shapes": None,  # trained by this project, shipped in the package (tgate_trt/export/shapes)
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
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(UserError, ValueError):
    """The --model argument can't be turned into a pipeline; the message says what to pass instead."""


@dataclass
class SourceModel:
    pipe: Any  # diffusers.StableDiffusionPipeline
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest
    defaults: dict[str, Any] = field(default_factory=dict)  # the model's own run defaults (e.g. its guidance)


# --- architecture configs (kept in code so --random-weights needs no download) ----------------------
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
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
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": _UNET_SD15,
        "vae": {**_VAE_SD, "sample_size": 512},
        "text_encoder": CLIP_L,
        "scheduler": SD_SCHEDULER,
    },
    "sd21": {
        "unet": {
            **_UNET_SD15,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**_VAE_SD, "sample_size": 768},
        "text_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        "scheduler": {**SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "tiny": {
        # SD-1.5 shape at toy width: VAE factor 8, cross-attention at two resolutions (7 attn2 layers).
        "unet": {
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
        },
        "vae": {
            **_VAE_SD,
            "block_out_channels": [16, 16, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        "scheduler": SD_SCHEDULER,
    },
}
ARCHITECTURES.update(more_architectures(ARCHITECTURES))  # tiny-sd21, SDXL and LCM presets
TINY_SEED = 0


# --- a tokenizer that needs no download -------------------------------------------------------------
def write_char_tokenizer(folder: Path) -> Path:
    """Write a character-level CLIP BPE vocabulary (no merges): a real ``CLIPTokenizer`` that works
    offline. It stands in for CLIP's 49k vocabulary wherever only the architecture matters."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def char_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_char_tokenizer(Path(tmp))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_from_architecture(name: str, seed: int = TINY_SEED) -> Any:
    """A pipeline with the preset's architecture and seeded random weights; nothing is downloaded."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = ARCHITECTURES[name]
    if "pipeline" in arch:  # the families' presets (families.py)
        return build_pipeline(name, arch, seed)
    tokenizer = char_tokenizer()
    text_config = CLIPTextConfig(
        **arch["text_encoder"],
        vocab_size=max(len(tokenizer), 49408 if name != "tiny" else 0),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(text_config)
        for module in (unet, vae, text_encoder):
            _perturb_constant_parameters(module)
    scheduler = DDIMScheduler.from_config({k: v for k, v in arch["scheduler"].items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _perturb_constant_parameters(module: torch.nn.Module, std: float = 0.02) -> None:
    """Give norm weights and zero biases small noise, as training would.

    Fresh initialisation makes hundreds of tensors identical (all ones or zeros); the ONNX exporter
    then stores them once, so graph sizes and parameter counts would not be those of a trained model.
    """
    for param in module.parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            param.add_(torch.randn_like(param) * std)


def build_tiny(seed: int = TINY_SEED) -> Any:
    """The deterministic tiny SD-1.5-shaped pipeline used by tests and the README's first command."""
    return build_from_architecture("tiny", seed)


# --- resolving --model ------------------------------------------------------------------------------
def check_diffusers_folder(folder: Path) -> None:
    """Fail fast, before loading weights, when a folder is not a Stable Diffusion pipeline."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json): pass a folder saved "
            "with StableDiffusionPipeline.save_pretrained, a .safetensors/.ckpt checkpoint, or a preset"
        )
    try:
        info = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{index} is not valid JSON: {exc}") from exc
    cls = info.get("_class_name", "")
    required = REQUIRED_COMPONENTS + (("text_encoder_2", "tokenizer_2") if "XL" in cls else ())
    missing = [c for c in required if c not in info or not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{folder} is not a Stable Diffusion pipeline: missing component(s) {', '.join(missing)} "
            f"(needs {', '.join(required)})"
        )
    if cls not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"{folder} holds a {cls or 'unknown'} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}"
        )


def _offline_hint(what: str) -> str:
    return (
        f"could not load {what} from the Hugging Face Hub (offline, unknown id, or not in the local cache). "
        "Pass a local diffusers folder (--model /path/to/folder) or a single-file checkpoint, or use "
        "--random-weights with a preset to build the architecture without downloading weights"
    )


def _load_pretrained(ref: str, local: bool, preset: str | None = None) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        if preset in HUB_PRESETS or (local and _pipeline_class(Path(ref)) != "StableDiffusionPipeline"):
            return load_pretrained(ref, local, preset)
        return StableDiffusionPipeline.from_pretrained(
            ref, safety_checker=None, requires_safety_checker=False, local_files_only=local
        )
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load the diffusers folder {ref}: {exc}") from exc
        raise ModelLoadError(_offline_hint(repr(ref))) from exc


def _pipeline_class(folder: Path) -> str:
    return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))


def _load_single_file(path: Path, config: str | None) -> Any:
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    local = config is not None and Path(config).is_dir()
    if config is not None and local:
        check_diffusers_folder(Path(config))
    mismatch = f"{path} does not match the architecture of {config or 'the config diffusers inferred'}"
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local,
        )
    except (OSError, ValueError, KeyError, SingleFileComponentError) as exc:
        raise ModelLoadError(
            f"could not load the checkpoint {path}: {str(exc).rstrip('. ')}. A single-file checkpoint "
            "carries weights but not the tokenizer or configs: offline, pass --config with a local "
            "diffusers folder of the same architecture"
        ) from exc
    except NotImplementedError as exc:  # accelerate can't move a model whose missing weights are still "meta"
        raise ModelLoadError(f"{mismatch}: weights are missing ({exc})") from exc
    # Weights the checkpoint lacks stay on the "meta" device without an error (seen for the text encoder).
    missing = [
        f"{name}.{key}"
        for name in ("unet", "vae", "text_encoder")
        for key, tensor in [*getattr(pipe, name).named_parameters(), *getattr(pipe, name).named_buffers()]
        if tensor.is_meta
    ]
    if missing:
        raise ModelLoadError(f"{mismatch}: it lacks {len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    return pipe


def resolve_model(model: str, random_weights: bool = False, config: str | None = None) -> SourceModel:
    """Turn ``--model`` into a loaded pipeline plus the facts the manifest records about its origin."""
    path = Path(model).expanduser()
    if random_weights:
        if model not in ARCHITECTURES:
            raise ModelLoadError(
                f"--random-weights needs a preset name ({', '.join(ARCHITECTURES)}), got {model!r}"
            )
        return SourceModel(build_from_architecture(model), _source(model, "preset", True))
    if model == "tiny":
        return SourceModel(build_tiny(), _source(model, "preset", True))
    if model in ARCHITECTURES and PRESETS.get(model, "") is None:  # tiny-* variants, built in-process
        return SourceModel(build_from_architecture(model), _source(model, "preset", True))
    if model == "shapes":
        from . import shapes

        try:
            pipe, record = shapes.load(), shapes.verify()
        except shapes.ShapesWeightsError as exc:
            raise ModelLoadError(str(exc)) from exc
        source = {**_source(model, "preset"), "weights_sha256": record["files"]}
        return SourceModel(pipe, source, dict(shapes.DEFAULTS))
    if model in PRESETS:
        hub_id = PRESETS[model]
        assert hub_id is not None
        return SourceModel(
            _load_pretrained(hub_id, local=False, preset=model), {**_source(model, "preset"), "hub_id": hub_id}
        )
    if path.is_dir():
        check_diffusers_folder(path)
        return SourceModel(_load_pretrained(str(path), local=True), _source(str(path.resolve()), "folder"))
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"{path} is not a checkpoint: single-file models end in {' or '.join(CHECKPOINT_SUFFIXES)}"
            )
        return SourceModel(_load_single_file(path, config), _source(str(path.resolve()), "single_file"))
    if path.suffix in CHECKPOINT_SUFFIXES or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"{model} does not exist: pass an existing folder or checkpoint file")
    if model.count("/") == 1:
        return SourceModel(_load_pretrained(model, local=False), {**_source(model, "hub"), "hub_id": model})
    raise ModelLoadError(
        f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a local diffusers folder, "
        "a .safetensors/.ckpt file, or a hub id such as org/name"
    )


def _source(model: str, kind: str, random_weights: bool = False) -> dict[str, Any]:
    preset = model if kind == "preset" else None
    return {"model": model, "kind": kind, "preset": preset, "random_weights": random_weights}


def apply_lcm_lora(src: SourceModel, lora: Path) -> SourceModel:
    """Fuse an LCM-LoRA (e.g. ``latent-consistency/lcm-lora-sdxl``) into the UNet and switch to the LCM
    sampler: the result is a guidance-free model, exported and gated like any other LCM pipeline."""
    from diffusers import LCMScheduler

    from ..manifest import sha256_file

    pipe = src.pipe
    try:
        import peft  # noqa: F401  (diffusers loads LoRA weights through peft)
    except ImportError as exc:
        raise ModelLoadError("--lcm-lora needs peft: pip install 'tgate-trt[lora]'") from exc
    try:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lcm")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load {lora} as a LoRA for this pipeline: {exc}") from exc
    pipe.fuse_lora(adapter_names=["lcm"])
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    source = {**src.source, "lcm_lora": {"file": str(lora.resolve()), "sha256": sha256_file(lora)}}
    return SourceModel(pipe, source, src.defaults)

