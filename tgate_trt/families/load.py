"""Where a pipeline comes from: ``--model`` resolved to a preset, a local folder, a single file, a hub id
or seeded random weights, plus the facts the manifest records about its origin."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract.errors import UserError
from .build import build_from_architecture, build_tiny
from .presets import ARCHITECTURES, HUB_PRESETS, PRESETS
from .schedulers import make_scheduler
from .spec import ModelLoadError
from .zoo import ZooModel, zoo_model

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class SourceModel:
    pipe: Any  # a diffusers pipeline of a supported family
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest
    defaults: dict[str, Any] = field(default_factory=dict)  # the model's own run defaults (e.g. its guidance)


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


def _pipeline_class(folder: Path) -> str:
    return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))


def _from_pretrained(ref: str, local: bool, preset: str | None) -> Any:
    """SD pipelines as ``StableDiffusionPipeline`` (no safety checker); SDXL / LCM ones as whatever the
    folder holds, with ``lcm-sdxl`` assembled as its distilled UNet on SDXL base."""
    import diffusers

    if preset == "lcm-sdxl":
        unet = diffusers.UNet2DConditionModel.from_pretrained(ref, local_files_only=local)
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            HUB_PRESETS["sdxl"], unet=unet, local_files_only=local, add_watermarker=False
        )
        pipe.scheduler = make_scheduler(pipe.scheduler.config, "lcm")
        return pipe
    if preset not in HUB_PRESETS and not (local and _pipeline_class(Path(ref)) != "StableDiffusionPipeline"):
        return diffusers.StableDiffusionPipeline.from_pretrained(
            ref, safety_checker=None, requires_safety_checker=False, local_files_only=local
        )
    pipe = diffusers.DiffusionPipeline.from_pretrained(ref, local_files_only=local)
    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        pipe.watermark = None  # the watermark is post-processing outside the graphs
    elif getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def _load_pretrained(ref: str, local: bool, preset: str | None = None) -> Any:
    try:
        return _from_pretrained(ref, local, preset)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load the diffusers folder {ref}: {exc}") from exc
        raise ModelLoadError(_offline_hint(repr(ref))) from exc


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


def _load_zoo(name: str, model: ZooModel) -> SourceModel:
    try:
        pipe, record = model.load(), model.verify()
    except UserError as exc:
        raise ModelLoadError(str(exc)) from exc
    source = {**_source(name, "preset"), "weights_sha256": record["files"]}
    return SourceModel(pipe, source, dict(model.DEFAULTS))


def resolve_model(model: str, random_weights: bool = False, config: str | None = None) -> SourceModel:
    """Turn ``--model`` into a loaded pipeline plus the facts the manifest records about its origin."""
    path = Path(model).expanduser()
    if random_weights:
        if model not in ARCHITECTURES:
            raise ModelLoadError(f"--random-weights needs a preset name ({', '.join(ARCHITECTURES)}), got {model!r}")
        return SourceModel(build_from_architecture(model), _source(model, "preset", True))
    if model == "tiny":
        return SourceModel(build_tiny(), _source(model, "preset", True))
    if model in ARCHITECTURES and PRESETS.get(model, "") is None:  # tiny-* variants, built in-process
        return SourceModel(build_from_architecture(model), _source(model, "preset", True))
    zoo = zoo_model(model) if "/" not in model and model in PRESETS else None
    if zoo is not None:
        return _load_zoo(model, zoo)
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
    pipe.scheduler = make_scheduler(pipe.scheduler.config, "lcm")
    source = {**src.source, "lcm_lora": {"file": str(lora.resolve()), "sha256": sha256_file(lora)}}
    return SourceModel(pipe, source, src.defaults)
