"""The graph contract between export, engines, runtime and Triton.

Every later stage reads ``manifest.json`` through this module instead of re-deriving tensor names,
shapes or gate semantics from the graphs, so a change to the contract happens in exactly one place.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .contract import limits
from .contract.errors import UsageError, UserError
from .contract.files import MANIFEST_NAME, MARKER, atomic_write_json, atomic_write_text, staged_dir

__all__ = ["MANIFEST_NAME", "MARKER", "atomic_write_text", "staged_dir"]  # re-exported for later stages

# 2: every file of an export under sha256 (tokenizer, scheduler, configs), defaults.max_pixels, schema
FORMAT_VERSION = 2

# Graph keys; folder names follow optimum's layout (``<part>/model.onnx``).
PREGATE = "unet_pregate"
POSTGATE = "unet_postgate"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL only; optional graphs are listed in ``Manifest.graphs``
VAE_DECODER = "vae_decoder"
GRAPH_KEYS = (TEXT_ENCODER, PREGATE, POSTGATE, VAE_DECODER)  # the graphs every export has
QUANTIZATION = "quantization"  # manifest.extra section of a tgate-quantize copy (int8 CPU graphs)
UNET = "unet"  # optimum's UNet folder; a T-GATE export keeps its UNet graph variants here (see unet_graph_file)


def graph_file(key: str, unet: bool) -> str:
    """Where graph ``key`` lives in an export: optimum's ``<part>/model.onnx``, except the UNet variants, which
    sit side by side as ``unet/<key>.onnx`` so that they share one external-data file, ``unet/model.onnx_data``
    (each weight written once; ONNX Runtime refuses external data outside a graph's own folder)."""
    return f"{UNET}/{key}.onnx" if unet else f"{key}/model.onnx"


# Tensor names of the two UNet graphs.
SAMPLE = "sample"
TIMESTEP = "timestep"
PROMPT_EMBEDS = "prompt_embeds"
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"
GUIDANCE_SCALE = "guidance_scale"
NOISE_PRED = "noise_pred"
# SDXL's added conditioning (pooled text embeddings and micro-conditioning size ids).
TEXT_EMBEDS = "text_embeds"
NEGATIVE_TEXT_EMBEDS = "negative_text_embeds"
TIME_IDS = "time_ids"
NEGATIVE_TIME_IDS = "negative_time_ids"

# Symbolic dimension names shared by all graphs.
BATCH = "batch"
CFG_BATCH = "cfg_batch"  # 2 * batch: both CFG branches (a CFG graph's self-attention caches)
LATENT_H = "latent_height"
LATENT_W = "latent_width"


def cache_name(index: int) -> str:
    """Name of the ``index``-th cache tensor: an output of the pre-gate, an input of the post-gate graph."""
    return f"cache_{index:02d}"


def hw_dim(level: int) -> str:
    """Symbolic token-count dimension of a cache at latent downsample factor ``level``."""
    return f"hw_x{level}"


GATE_SEMANTICS = (
    "steps i < gate_step run unet_pregate (CFG inside the graph: latents batch B are duplicated, "
    "encoder states are [negative; prompt], noise = uncond + guidance_scale * (text - uncond)); "
    "the cache_* outputs of step i == gate_step - 1 (each the mean of the CFG halves of one attn2 "
    "output after to_out, shape [B, HW, C]) are kept; steps i >= gate_step run unet_postgate on batch "
    "B with those caches and use its output directly as the noise prediction. gate_step >= steps is "
    "plain CFG; gate_step <= 0 is invalid."
)


GATE_SEMANTICS_GUIDANCE_FREE = (
    "guidance-free model (no CFG): steps i < gate_step run unet_pregate on batch B with the prompt "
    "embeddings alone; the cache_* outputs of step i == gate_step - 1 (each one attn2 output after "
    "to_out, as-is, shape [B, HW, C]: nothing to average) are kept; steps i >= gate_step run "
    "unet_postgate on the same batch B with those caches. gate_step >= steps is a plain run; "
    "gate_step <= 0 is invalid."
)
ADDED_CONDITIONING_SEMANTICS = (
    " Added conditioning (SDXL): unet_pregate takes text_embeds/time_ids for both CFG branches; "
    "unet_postgate takes the negative branch's (negative_text_embeds, negative_time_ids) when the model "
    "uses CFG, else the prompt's (text_embeds, time_ids)."
)

FAMILIES = ("sd", "sdxl", "lcm", "lcm-sdxl")


@dataclass
class ModelFamily:
    """What kind of model the graphs hold; every stage reads this instead of re-deriving it.

    ``family``: ``sd`` (SD-1.x/2.x: one text encoder, CFG), ``sdxl`` (two text encoders, pooled
    ``text_embeds`` and ``time_ids`` as added conditioning, CFG), ``lcm`` / ``lcm-sdxl`` (guidance-free
    latent-consistency models of either shape: no CFG, the cache is the attn2 output itself).
    """

    family: str = "sd"
    cfg: bool = True  # CFG inside the pre-gate graph; False: batch B throughout, no averaging
    added_conditioning: bool = False  # SDXL text_embeds + time_ids inputs
    guidance_embedding: int | None = None  # UNet time_cond_proj_dim: guidance_scale enters as a w-embedding
    prediction_type: str = "epsilon"  # what the UNet predicts (the scheduler config says the same)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UsageError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.cfg and self.guidance_embedding is not None:
            raise UsageError("a UNet with a guidance embedding (time_cond_proj_dim) is guidance-free: no CFG")

    @property
    def takes_guidance(self) -> bool:
        """Whether ``guidance_scale`` is a graph input (CFG weight or the w-embedding's value)."""
        return self.cfg or self.guidance_embedding is not None


def conditioning_inputs(
    family: ModelFamily, postgate: bool = False, *, cfg: bool | None = None, text: bool | None = None
) -> list[str]:
    """Names of the conditioning inputs of one UNet graph, in graph order (after sample, timestep).

    A graph with CFG inside (``cfg``) takes both branches; one that computes cross-attention (``text``)
    takes the text states. A graph whose attn2 replays reads no text states at all, but SDXL's added
    conditioning and a guidance embedding still feed its time embedding, so those stay. Which added
    conditioning a graph without CFG takes is in the names: the negative branch's when the family uses
    CFG (as the authors' ``TgateSDXLLoader`` does after the gate), the prompt's when it is guidance-free.
    ``postgate`` is V1's shorthand: no CFG, no text.
    """
    cfg = (family.cfg and not postgate) if cfg is None else cfg
    text = (not postgate) if text is None else text
    names: list[str] = []
    if text:
        names += [PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS] if cfg else [PROMPT_EMBEDS]
    if family.added_conditioning:
        if cfg:
            names += [TEXT_EMBEDS, NEGATIVE_TEXT_EMBEDS, TIME_IDS, NEGATIVE_TIME_IDS]
        elif family.cfg:
            names += [NEGATIVE_TEXT_EMBEDS, NEGATIVE_TIME_IDS]
        else:
            names += [TEXT_EMBEDS, TIME_IDS]
    if family.guidance_embedding is not None or cfg:
        names.append(GUIDANCE_SCALE)
    return names


def gate_semantics(family: ModelFamily) -> str:
    text = GATE_SEMANTICS if family.cfg else GATE_SEMANTICS_GUIDANCE_FREE
    return text + (ADDED_CONDITIONING_SEMANTICS if family.added_conditioning else "")


MAX_STEPS = limits.MAX_STEPS


def check_gate(num_inference_steps: int, gate_step: int) -> None:
    """The gate rule every stage applies: a cache needs at least one CFG step before it."""
    limits.check_steps(num_inference_steps)
    limits.check_gate(num_inference_steps, gate_step)


class ManifestError(UserError, RuntimeError):
    """The export folder does not match its manifest (missing, corrupt or incompatible)."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: list[int | str]  # str = symbolic dimension


@dataclass
class GraphSpec:
    file: str  # path of model.onnx relative to the export folder
    files: dict[str, str]  # every file of the graph (model + external data) -> sha256
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int = 0  # number of float weights in the graph

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name)

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name)


@dataclass
class CacheLayer:
    index: int
    name: str  # cache tensor name
    module: str  # attn2 module path in the diffusers UNet
    channels: int
    level: int  # latent downsample factor: the cache has (latent_h / level) * (latent_w / level) tokens
    kind: str = "attn2"  # attn2 (cross-attention) or attn1 (self-attention, T-GATE V2)

    def tokens(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.level) * (latent_w // self.level)


@dataclass
class Manifest:
    source: dict[str, Any]
    dtype: str
    opset: int
    graphs: dict[str, GraphSpec]
    cache_layers: list[CacheLayer]
    latent: dict[str, Any]  # channels, vae_scale_factor, scaling_factor, multiple (latent size divisor)
    text: dict[str, Any]  # max_length, hidden_size, tokenizer folder
    defaults: dict[str, Any]  # steps, gate_step, guidance_scale, height, width
    scheduler: str  # folder holding scheduler_config.json
    tools: dict[str, str]
    gate: dict[str, Any] = field(default_factory=lambda: {"semantics": GATE_SEMANTICS, "cfg_in_graph": True})
    validation: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # later stages' sections (e.g. engines)
    format_version: int = FORMAT_VERSION
    model: ModelFamily = field(default_factory=ModelFamily)  # absent in older manifests: SD
    files: dict[str, str] = field(default_factory=dict)  # every other file (tokenizer, scheduler, configs)
    schedule: str = "v1"  # v1: attn2 cached (two UNet graphs); v2: attn1 on a schedule too
    variants: dict[str, Any] = field(default_factory=dict)  # UNet graph key -> {cfg, replay, capture}

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Schema-checked: a wrong, missing or inconsistent field is a ManifestError naming it."""
        from .contract.schema import check_manifest

        check_manifest(data, FORMAT_VERSION, ManifestError)
        data = dict(data)
        data["graphs"] = {
            k: GraphSpec(
                **{
                    **g,
                    "inputs": [TensorSpec(**t) for t in g["inputs"]],
                    "outputs": [TensorSpec(**t) for t in g["outputs"]],
                }
            )
            for k, g in data["graphs"].items()
        }
        data["cache_layers"] = [CacheLayer(**c) for c in data["cache_layers"]]
        data["model"] = ModelFamily(**data.get("model", {}))
        return cls(**data)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        return atomic_write_json(Path(folder) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike[str], verify: bool = True) -> Manifest:
        """Read ``manifest.json``; with ``verify`` every file it names must exist with its sha256."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if folder.exists() and not folder.is_dir():
            raise ManifestError(f"{folder} is not a folder: pass the export folder tgate-export wrote")
        if not folder.is_dir():
            raise ManifestError(f"export folder {folder} does not exist: run tgate-export first")
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not a tgate-export folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}): re-export the model") from exc
        except OSError as exc:
            raise ManifestError(f"{path} can't be read ({exc.strerror})") from exc
        manifest = cls.from_dict(data)
        if verify:
            manifest.verify(folder)
        return manifest

    def verify(self, folder: str | os.PathLike[str], graphs: tuple[str, ...] | None = None) -> None:
        """Check every graph file (and every other file) against its sha256; the message names the bad file.

        ``graphs`` limits the graph files checked (a backend that reads only some); the tokenizer,
        scheduler and config files are always checked, since every backend reads them."""
        wanted: dict[str, str] = {}  # the UNet variants share one weights file: hashed once
        for key in graphs if graphs is not None else tuple(self.graphs):
            wanted.update(self.graphs[key].files)
        check_files(Path(folder), wanted, "re-export the model")
        check_files(Path(folder), self.files, "re-export the model")

    # --- derived facts -------------------------------------------------------------------------
    @property
    def cache_names(self) -> list[str]:
        """attn2 cache tensors (V1's caches), in graph order."""
        return [c.name for c in self.cache_layers if c.kind == "attn2"]

    @property
    def sites(self) -> dict[str, list[str]]:
        """Cache tensor names per attention kind, in graph order."""
        out: dict[str, list[str]] = {"attn1": [], "attn2": []}
        for c in self.cache_layers:
            out[c.kind].append(c.name)
        return out

    @property
    def text_encoders(self) -> list[dict[str, Any]]:
        """Per text encoder graph: its tokenizer folder, the output the UNet reads, the pooled output."""
        default = [{"graph": TEXT_ENCODER, "tokenizer": self.text["tokenizer"], "output": "last_hidden_state"}]
        return list(self.text.get("encoders", default))

    def encoder_batch(self, batch: int) -> int:
        """Batch the text encoders run at: prompts and negatives together with CFG, prompts alone without."""
        return 2 * batch if self.model.cfg else batch

    @property
    def size_multiple(self) -> int:
        """Image sizes the graphs take are multiples of this."""
        return int(self.latent["vae_scale_factor"] * self.latent["multiple"])

    @property
    def max_pixels(self) -> int:
        """The export's pixel cap per image on this machine (a memory budget), overridable at load."""
        return self.pixel_cap()

    def pixel_cap(self, share: int = 1) -> int:
        """The pixel cap with ``share`` copies of the export on this machine (Triton's instances): derived
        from ``defaults.memory`` (the measured fit) and this machine's memory where the export has one, else
        ``defaults.max_pixels`` (older exports: 4x the native size); never past the graphs' fixed size."""
        memory = self.defaults.get("memory")
        if not memory:
            return int(self.defaults["max_pixels"])
        height, width = int(self.defaults["height"]), int(self.defaults["width"])
        itemsize = 2 if self.dtype == "fp16" else 4
        unets = [g.parameters for k, g in self.graphs.items() if k in self.variants]  # held once (shared weights)
        others = [g.parameters for k, g in self.graphs.items() if k not in self.variants]
        weights = itemsize * (sum(others) + max(unets, default=0))
        cap = limits.default_max_pixels(height, width, memory, weights, share)
        fixed = self.graphs[next(iter(self.variants))].input(SAMPLE).shape[2:]  # a graph for one size only
        if all(isinstance(d, int) for d in fixed):
            cap = min(cap, int(fixed[0]) * int(fixed[1]) * int(self.latent["vae_scale_factor"]) ** 2)
        return cap

    @property
    def native_size(self) -> tuple[int, int] | None:
        """The only size (height, width) the model draws, for a model trained at one size (``shapes``);
        None when any size the graphs take is fine."""
        size = self.defaults.get("native_size")
        return None if size is None else (int(size[0]), int(size[1]))

    def check_native_size(self, height: int, width: int) -> None:
        """Refuse another size for a model that draws only at its native size (graphs would take it, but
        the images are wrong: ``shapes`` at 96x96 draws two shapes)."""
        native = self.native_size
        if native is not None and (height, width) != native:
            model = self.source.get("model", "this export's model")
            raise UsageError(
                f"{model} draws only at its native size {native[0]}x{native[1]} (it was trained at that size), "
                f"got {height}x{width}: leave --height and --width unset"
            )

    def latent_size(self, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        """Latent size for an image size, or a UsageError saying which sizes the graphs accept."""
        cap = self.max_pixels if max_pixels is None else max_pixels
        height, width = limits.check_size(height, width, self.size_multiple, cap)
        return height // self.latent["vae_scale_factor"], width // self.latent["vae_scale_factor"]


def _find(specs: list[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no tensor named {name!r}; have {[s.name for s in specs]}")


def check_files(folder: Path, files: dict[str, str], remedy: str, error: type[ManifestError] = ManifestError) -> None:
    """Every file (path relative to ``folder`` -> sha256) present and unchanged; the message names the file."""
    for rel, digest in files.items():
        file = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise error(f"{MANIFEST_NAME} names {rel!r}, which is outside the folder: {remedy}")
        if not file.is_file():
            raise error(f"{file} is missing (named by {MANIFEST_NAME}): {remedy}")
        actual = sha256_file(file)
        if actual != digest:
            raise error(
                f"{file} does not match its sha256 in {MANIFEST_NAME} (expected {digest[:16]}..., found "
                f"{actual[:16]}...): the file was modified or corrupted; {remedy}"
            )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
