"""The schema of ``manifest.json``, checked on every load so a broken field is named, not a traceback.

Declared with typed dicts and validated by pydantic (used here only to check: the manifest is still
built from the raw data). Beyond types, :func:`check_manifest` checks what ties fields together: the
graphs every export has, the cache tensors the two UNet graphs exchange, paths inside the folder.
"""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from . import limits
from .errors import UserError

_OPEN = ConfigDict(extra="allow")  # later stages add keys (extra.engines, text.encoders, notes)
_Positive = Annotated[int, Field(gt=0)]  # sizes and factors the runtime divides by or allocates
_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@with_config(_OPEN)
class _Tensor(TypedDict):
    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "bool"]
    shape: list[int | str]


@with_config(_OPEN)
class _Graph(TypedDict):
    file: str
    files: dict[str, _Sha256]
    inputs: list[_Tensor]
    outputs: list[_Tensor]
    parameters: int


@with_config(_OPEN)
class _Cache(TypedDict):
    index: int
    name: str
    module: str
    channels: _Positive
    level: _Positive
    kind: Literal["attn1", "attn2"]


@with_config(_OPEN)
class _Variant(TypedDict):
    cfg: bool
    replay: list[Literal["attn1", "attn2"]]
    capture: list[tuple[Literal["attn1", "attn2"], Literal["full", "mean"]]]


@with_config(_OPEN)
class _Latent(TypedDict):
    channels: _Positive
    vae_scale_factor: _Positive
    scaling_factor: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    multiple: _Positive


@with_config(_OPEN)
class _Encoder(TypedDict):
    graph: str
    tokenizer: str
    output: str


@with_config(_OPEN)
class _Text(TypedDict):
    max_length: Annotated[int, Field(ge=3)]  # start and end tokens, and at least one of the prompt's
    hidden_size: _Positive
    tokenizer: str
    encoders: NotRequired[list[_Encoder]]


_Bytes = Annotated[float, Field(ge=0, allow_inf_nan=False)]


@with_config(_OPEN)
class _Fit(TypedDict):
    a: _Bytes  # peak bytes of a generation = a + b * pixels + c * pixels**2 (tgate_trt.export.memory)
    b: _Bytes
    c: _Bytes


@with_config(_OPEN)
class _Memory(TypedDict):
    """The measured fit the runtime derives its pixel cap from (absent in older exports: 4x the native size)."""

    fit: _Fit
    sizes: list[tuple[_Positive, _Positive]]
    peak_bytes: list[Annotated[int, Field(ge=0)]]
    bytes_per_pixel: _Bytes
    graphs: NotRequired[list[str]]
    method: NotRequired[str]


@with_config(_OPEN)
class _Defaults(TypedDict):
    steps: int
    gate_step: int
    guidance_scale: float
    height: int
    width: int
    max_pixels: int
    sp_interval: int
    fi_interval: int
    warm_up: int
    # [height, width]: the only size the model draws (trained at one size, e.g. shapes at 64x64)
    native_size: NotRequired[tuple[_Positive, _Positive]]
    memory: NotRequired[_Memory]


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
    dtype: Literal["fp32", "fp16"]
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
    files: dict[str, _Sha256]
    schedule: Literal["v1", "v2"]
    variants: dict[str, _Variant]


_ADAPTER = TypeAdapter(_Manifest)
REQUIRED_GRAPHS = ("text_encoder", "vae_decoder")  # and every variant's UNet graph


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
    if not data["variants"]:
        raise error(f"manifest.json field variants: no UNet graph variants: {fix}")
    sites: dict[str, list[str]] = {"attn1": [], "attn2": []}
    for c in data["cache_layers"]:
        sites[c["kind"]].append(c["name"])
    for key, variant in data["variants"].items():
        if key not in graphs:
            raise error(f"manifest.json field graphs: the variant graph {key!r} is missing: {fix}")
        want_in = sorted(n for k in variant["replay"] for n in sites[k])
        want_out = sorted(n for k, _ in variant["capture"] for n in sites[k])
        got_in = sorted(t["name"] for t in graphs[key]["inputs"] if t["name"] in sites["attn1"] + sites["attn2"])
        got_out = sorted(t["name"] for t in graphs[key]["outputs"] if t["name"] != "noise_pred")
        if got_in != want_in or got_out != want_out:
            raise error(
                f"manifest.json field cache_layers: {len(sites['attn2'])} attn2 and {len(sites['attn1'])} attn1 "
                f"layers, but the graph {key} takes {len(got_in)} caches and outputs {len(got_out)}: {fix}"
            )
    paths = [data["scheduler"], data["text"]["tokenizer"], *data["files"]]
    for graph in graphs.values():
        paths += [graph["file"], *graph["files"]]
    for rel in paths:
        if rel.startswith("/") or ".." in rel.replace("\\", "/").split("/"):
            raise error(f"manifest.json names the path {rel!r}, outside the export folder: {fix}")
    _check_hashed(data, error, fix)
    defaults = data["defaults"]
    try:
        limits.check_steps(defaults["steps"])
        limits.check_gate(defaults["steps"], defaults["gate_step"])
        limits.check_guidance(defaults["guidance_scale"])
        limits.check_int("max_pixels", defaults["max_pixels"], 1)
        limits.check_int("sp_interval", defaults["sp_interval"], 1)
        limits.check_int("fi_interval", defaults["fi_interval"], 1)
        limits.check_int("warm_up", defaults["warm_up"], 0)
    except UserError as exc:
        raise error(f"manifest.json field defaults: {exc}: {fix}") from None


def _check_hashed(data: dict[str, Any], error: type[UserError], fix: str) -> None:
    """Every file the runtime reads is under sha256, and the tensors it allocates have the latent's shape."""
    for key, graph in data["graphs"].items():
        if graph["file"] not in graph["files"]:
            raise error(
                f"manifest.json field graphs.{key}.file: {graph['file']!r} is not among its hashed files: {fix}"
            )
        for tensor in graph["inputs"]:
            shape = tensor["shape"]
            if tensor["name"] in ("sample", "latent_sample") and (
                len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != data["latent"]["channels"])
            ):
                raise error(
                    f"manifest.json field graphs.{key}.inputs: {tensor['name']} has shape {shape}, not "
                    f"[batch, {data['latent']['channels']} (latent.channels), height, width]: {fix}"
                )
    tokenizers = {data["text"]["tokenizer"], *(e["tokenizer"] for e in data["text"].get("encoders", []))}
    needed = [posixpath.join(data["scheduler"], "scheduler_config.json")]
    needed += [posixpath.join(t, name) for t in sorted(tokenizers) for name in ("vocab.json", "merges.txt")]
    for rel in needed:
        if rel not in data["files"]:
            raise error(f"manifest.json field files: {rel} (read by the runtime) is not under sha256: {fix}")
