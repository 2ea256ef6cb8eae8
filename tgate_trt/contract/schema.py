"""The schema of ``manifest.json``, checked on every load so a broken field is named, not a traceback.

Declared with typed dicts and validated by pydantic (used here only to check: the manifest is still
built from the raw data). Beyond types, :func:`check_manifest` checks what ties fields together: the
graphs every export has, the cache tensors the two UNet graphs exchange, paths inside the folder.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from . import limits
from .errors import UserError

_OPEN = ConfigDict(extra="allow")  # later stages add keys (extra.engines, text.encoders, notes)


@with_config(_OPEN)
class _Tensor(TypedDict):
    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "bool"]
    shape: list[int | str]


@with_config(_OPEN)
class _Graph(TypedDict):
    file: str
    files: dict[str, str]
    inputs: list[_Tensor]
    outputs: list[_Tensor]
    parameters: int


@with_config(_OPEN)
class _Cache(TypedDict):
    index: int
    name: str
    module: str
    channels: int
    level: int


@with_config(_OPEN)
class _Latent(TypedDict):
    channels: int
    vae_scale_factor: int
    scaling_factor: float
    multiple: int


@with_config(_OPEN)
class _Text(TypedDict):
    max_length: int
    hidden_size: int
    tokenizer: str


@with_config(_OPEN)
class _Defaults(TypedDict):
    steps: int
    gate_step: int
    guidance_scale: float
    height: int
    width: int
    max_pixels: int


@with_config(_OPEN)
class _Model(TypedDict):
    family: Literal["sd", "sdxl", "lcm", "lcm-sdxl"]
    cfg: bool
    added_conditioning: NotRequired[bool]
    guidance_embedding: NotRequired[int | None]
    prediction_type: NotRequired[str]


@with_config(ConfigDict(extra="forbid"))
class _Manifest(TypedDict):
    format_version: int
    source: dict[str, Any]
    dtype: str
    opset: int
    graphs: dict[str, _Graph]
    cache_layers: list[_Cache]
    latent: _Latent
    text: _Text
    defaults: _Defaults
    scheduler: str
    tools: dict[str, str]
    gate: dict[str, Any]
    validation: list[dict[str, Any]]
    extra: dict[str, Any]
    model: _Model
    files: dict[str, str]


_ADAPTER = TypeAdapter(_Manifest)
REQUIRED_GRAPHS = ("text_encoder", "unet_pregate", "unet_postgate", "vae_decoder")


def check_manifest(data: Any, version: int, error: type[UserError]) -> None:
    """Raise ``error`` naming the first broken field; the remedy is always a re-export."""
    fix = "re-export the model with this version of tgate-trt"
    if not isinstance(data, dict):
        raise error(f"manifest.json holds a {type(data).__name__}, not an object: {fix}")
    if data.get("format_version") != version:
        raise error(f"manifest format_version {data.get('format_version')!r} is not {version}: {fix}")
    try:
        _ADAPTER.validate_python(data, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise error(f"manifest.json field {where}: {first['msg'].lower()}{more}: {fix}") from None
    _check_consistent(data, error, fix)


def _check_consistent(data: dict[str, Any], error: type[UserError], fix: str) -> None:
    graphs = data["graphs"]
    encoders = [e.get("graph") for e in data["text"].get("encoders", [])]
    for key in (*REQUIRED_GRAPHS, *encoders):
        if key not in graphs:
            raise error(f"manifest.json field graphs: the graph {key!r} is missing: {fix}")
    names = [c["name"] for c in data["cache_layers"]]
    produced = sorted(t["name"] for t in graphs["unet_pregate"]["outputs"] if t["name"].startswith("cache_"))
    consumed = sorted(t["name"] for t in graphs["unet_postgate"]["inputs"] if t["name"].startswith("cache_"))
    if sorted(names) != produced or sorted(names) != consumed:
        raise error(
            f"manifest.json field cache_layers: {len(names)} layers, but the pre-gate graph outputs "
            f"{len(produced)} caches and the post-gate graph takes {len(consumed)}: {fix}"
        )
    paths = [data["scheduler"], data["text"]["tokenizer"], *data["files"]]
    for graph in graphs.values():
        paths += [graph["file"], *graph["files"]]
    for rel in paths:
        if rel.startswith("/") or ".." in rel.replace("\\", "/").split("/"):
            raise error(f"manifest.json names the path {rel!r}, outside the export folder: {fix}")
    defaults = data["defaults"]
    try:
        limits.check_steps(defaults["steps"])
        limits.check_gate(defaults["steps"], defaults["gate_step"])
        limits.check_guidance(defaults["guidance_scale"])
        limits.check_int("max_pixels", defaults["max_pixels"], 1)
    except UserError as exc:
        raise error(f"manifest.json field defaults: {exc}: {fix}") from None
