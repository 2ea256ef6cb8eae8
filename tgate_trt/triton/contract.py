"""The served model's interface, in one place: inputs, output, parameters, and request parsing.

The config writer declares exactly these tensors and parameters, and the Triton model parses requests
with :func:`parse_request`, so the two can't drift apart. Nothing here imports Triton: the parsing
runs on plain numpy arrays and is usable (and testable) outside the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import manifest as mf
from ..contract.errors import UsageError


@dataclass(frozen=True)
class TensorDecl:
    name: str
    data_type: str  # Triton config type, e.g. TYPE_STRING
    dims: tuple[int, ...]
    optional: bool = True


IMAGE = "image"
INPUTS = (
    TensorDecl("prompt", "TYPE_STRING", (1,), optional=False),
    TensorDecl("negative_prompt", "TYPE_STRING", (1,)),
    TensorDecl("seed", "TYPE_INT64", (1,)),
    TensorDecl("steps", "TYPE_INT32", (1,)),
    TensorDecl("gate_step", "TYPE_INT32", (1,)),
    TensorDecl("guidance_scale", "TYPE_FP32", (1,)),
    TensorDecl("height", "TYPE_INT32", (1,)),
    TensorDecl("width", "TYPE_INT32", (1,)),
)
OUTPUTS = (TensorDecl(IMAGE, "TYPE_UINT8", (-1, -1, 3), optional=False),)

# numpy dtype kinds each Triton type arrives as (Triton itself rejects other wire types first).
_KINDS = {"TYPE_STRING": "OSU", "TYPE_INT64": "iu", "TYPE_INT32": "iu", "TYPE_FP32": "f"}

DEFAULT_MAX_STEPS = 50
SEED_LIMIT = 2**63


class RequestError(UsageError):
    """A request the model refuses; the message goes back to the client as-is."""


@dataclass(frozen=True)
class Settings:
    """Per-model serving settings, stored as ``parameters`` in config.pbtxt (all strings there)."""

    steps: int
    gate_step: int
    guidance_scale: float
    height: int
    width: int
    max_steps: int = DEFAULT_MAX_STEPS
    scheduler: str = ""  # empty: the export's own scheduler

    def check(self) -> None:
        """Refuse settings no request could be served with, before anything is written or loaded."""
        if not isinstance(self.max_steps, int) or not 1 <= self.max_steps <= mf.MAX_STEPS:
            raise UsageError(f"max_steps must be in 1..{mf.MAX_STEPS}, got {self.max_steps!r}")
        if not 1 <= self.steps <= self.max_steps:
            raise UsageError(f"default steps must be in 1..max_steps ({self.max_steps}), got {self.steps}")
        mf.check_gate(self.steps, self.gate_step)
        if not math.isfinite(self.guidance_scale):
            raise UsageError(f"default guidance_scale must be finite, got {self.guidance_scale!r}")

    def to_parameters(self) -> dict[str, str]:
        return {
            "default_steps": str(self.steps),
            "default_gate_step": str(self.gate_step),
            "default_guidance_scale": repr(float(self.guidance_scale)),
            "default_height": str(self.height),
            "default_width": str(self.width),
            "max_steps": str(self.max_steps),
            "scheduler": self.scheduler,
        }

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Settings:
        try:
            settings = cls(
                steps=int(params["default_steps"]),
                gate_step=int(params["default_gate_step"]),
                guidance_scale=float(params["default_guidance_scale"]),
                height=int(params["default_height"]),
                width=int(params["default_width"]),
                max_steps=int(params.get("max_steps", DEFAULT_MAX_STEPS)),
                scheduler=params.get("scheduler", ""),
            )
        except KeyError as exc:
            missing = exc.args[0]
            raise UsageError(f"config.pbtxt lacks the parameter {missing!r}: regenerate it with tgate-triton") from exc
        settings.check()
        return settings


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    gate_step: int
    guidance_scale: float
    height: int
    width: int

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TGatePipeline.__call__``."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.steps,
            "gate_step": self.gate_step,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
        }


def _scalar(name: str, array: np.ndarray) -> Any:
    decl = next(d for d in INPUTS if d.name == name)
    array = np.asarray(array)
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
    if array.dtype.kind not in _KINDS[decl.data_type]:
        raise RequestError(f"{name} must be {decl.data_type[5:]}, got {array.dtype}")
    value = array.reshape(-1)[0]
    if decl.data_type == "TYPE_STRING":
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"{name} is not valid UTF-8 ({exc.reason})") from exc
        return str(value)
    return value.item()


def parse_request(get: Callable[[str], np.ndarray | None], settings: Settings) -> GenerateRequest:
    """Read and check one request's inputs; ``get(name)`` returns the array or None when absent.

    Everything that depends only on the request is checked here; the export's own limits (sizes the
    graphs take) are checked by the pipeline before any graph runs.
    """

    def value(name: str, default: Any) -> Any:
        array = get(name)
        return default if array is None else _scalar(name, array)

    prompt = value("prompt", None)
    if prompt is None:
        raise RequestError("the input 'prompt' is required")
    if not prompt.strip():
        raise RequestError("prompt is empty: send a text describing the image")
    req = GenerateRequest(
        prompt=prompt,
        negative_prompt=value("negative_prompt", None),
        seed=int(value("seed", 0)),
        steps=int(value("steps", settings.steps)),
        gate_step=int(value("gate_step", settings.gate_step)),
        guidance_scale=float(value("guidance_scale", settings.guidance_scale)),
        height=int(value("height", settings.height)),
        width=int(value("width", settings.width)),
    )
    if not 0 <= req.seed < SEED_LIMIT:
        raise RequestError(f"seed must be in 0..2**63-1, got {req.seed}")
    if not 1 <= req.steps <= settings.max_steps:
        raise RequestError(f"steps must be in 1..{settings.max_steps} (this model's max_steps), got {req.steps}")
    if req.gate_step <= 0:
        raise RequestError(
            f"gate_step must be >= 1, got {req.gate_step}: the cache comes from the last CFG step; "
            "send gate_step >= steps for a plain CFG run"
        )
    if not math.isfinite(req.guidance_scale):
        raise RequestError(f"guidance_scale must be a finite number, got {req.guidance_scale!r}")
    if req.height <= 0 or req.width <= 0:
        raise RequestError(f"height and width must be positive, got {req.height}x{req.width}")
    return req
