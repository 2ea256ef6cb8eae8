"""The served model's interface, in one place: inputs, outputs, parameters, and request parsing.

The config writer declares exactly these tensors and parameters, and the Triton model parses requests
with :func:`parse_request`, so the two can't drift apart. Nothing here imports Triton: the parsing
runs on plain numpy arrays and is usable (and testable) outside the server. The bounds are the ones
the CLI and the Python API apply (:mod:`tgate_trt.contract.limits`), so a value refused there is
refused here with the same message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract import limits
from ..contract.errors import UsageError
from ..methods.plan import TGateParams
from ..methods.variants import schedule_of


@dataclass(frozen=True)
class TensorDecl:
    name: str
    data_type: str  # Triton config type, e.g. TYPE_STRING
    dims: tuple[int, ...]
    optional: bool = True


IMAGE = "image"  # [H, W, 3]: the image of a one-prompt request
IMAGES = "images"  # [B, H, W, 3]: one image per prompt
TRUNCATED = "truncated_tokens"  # [B]: a prompt's token count where it is past the text encoder window, else 0
INPUTS = (
    TensorDecl("prompt", "TYPE_STRING", (-1,), optional=False),  # 1..max_batch prompts
    TensorDecl("negative_prompt", "TYPE_STRING", (-1,)),  # one for all prompts, or one per prompt
    TensorDecl("seed", "TYPE_INT64", (1,)),
    TensorDecl("steps", "TYPE_INT32", (1,)),
    TensorDecl("gate_step", "TYPE_INT32", (1,)),
    TensorDecl("guidance_scale", "TYPE_FP32", (1,)),
    TensorDecl("height", "TYPE_INT32", (1,)),
    TensorDecl("width", "TYPE_INT32", (1,)),
    # T-GATE V2 (an export with --schedule v2): self-attention recomputed every N steps before / after the gate
    TensorDecl("sp_interval", "TYPE_INT32", (1,)),
    TensorDecl("fi_interval", "TYPE_INT32", (1,)),
    TensorDecl("warm_up", "TYPE_INT32", (1,)),
)
OUTPUTS = (
    TensorDecl(IMAGE, "TYPE_UINT8", (-1, -1, 3), optional=False),
    TensorDecl(IMAGES, "TYPE_UINT8", (-1, -1, -1, 3), optional=False),
    TensorDecl(TRUNCATED, "TYPE_INT32", (-1,), optional=False),
)

# numpy dtype kinds each Triton type arrives as (Triton itself rejects other wire types first).
_KINDS = {"TYPE_STRING": "OSU", "TYPE_INT64": "iu", "TYPE_INT32": "iu", "TYPE_FP32": "f"}

DEFAULT_MAX_STEPS = 50
DEFAULT_MAX_BATCH = 4  # prompts per request (the API's cap is limits.MAX_BATCH; a server's is smaller)
QUEUES = ("model", "triton")  # where image jobs wait: inside the model (bad requests refused on arrival) or Triton


class RequestError(UsageError):
    """A request the model refuses; the message goes back to the client as-is (HTTP 400, INVALID_ARGUMENT)."""


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
    size_multiple: int = 8  # image sizes the export's graphs take are multiples of this
    max_pixels: int = 0  # pixels per image (0: limits.default_max_pixels of the default size)
    max_batch: int = DEFAULT_MAX_BATCH
    queue: str = "model"
    schedule: str = "v1"  # the export's: v1 refuses requests that cache self-attention
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 0

    @property
    def pixel_cap(self) -> int:
        return self.max_pixels or limits.default_max_pixels(self.height, self.width)

    def check(self) -> None:
        """Refuse settings no request could be served with, before anything is written or loaded."""
        limits.check_int("max_steps", self.max_steps, 1, limits.MAX_STEPS)
        limits.check_steps(self.steps, self.max_steps, f"default steps (at most max_steps, {self.max_steps})")
        limits.check_gate(self.steps, self.gate_step)
        limits.check_float("default guidance_scale", self.guidance_scale, 0.0, limits.GUIDANCE_MAX)
        limits.check_int("max_pixels", self.max_pixels, 0)
        limits.check_int("max_batch", self.max_batch, 1, limits.MAX_BATCH)
        limits.check_int("size multiple", self.size_multiple, 1)
        self.params(self.gate_step, self.sp_interval, self.fi_interval, self.warm_up)
        if self.queue not in QUEUES:
            raise UsageError(f"queue must be one of {', '.join(QUEUES)}, got {self.queue!r}")
        try:
            limits.check_size(self.height, self.width, self.size_multiple, self.pixel_cap)
        except UsageError as exc:
            raise UsageError(f"the default image size does not fit: {exc}") from exc

    def to_parameters(self) -> dict[str, str]:
        return {
            "default_steps": str(self.steps),
            "default_gate_step": str(self.gate_step),
            "default_guidance_scale": repr(float(self.guidance_scale)),
            "default_height": str(self.height),
            "default_width": str(self.width),
            "max_steps": str(self.max_steps),
            "scheduler": self.scheduler,
            "size_multiple": str(self.size_multiple),
            "max_pixels": str(self.pixel_cap),
            "max_batch": str(self.max_batch),
            "queue": self.queue,
            "schedule": self.schedule,
            "default_sp_interval": str(self.sp_interval),
            "default_fi_interval": str(self.fi_interval),
            "default_warm_up": str(self.warm_up),
        }

    def params(self, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int) -> TGateParams:
        """A request's T-GATE parameters, refused when this export can't serve them."""
        params = TGateParams(gate_step, sp_interval, fi_interval, warm_up)
        if self.schedule == "v1" and schedule_of(params) == "v2":
            raise UsageError(
                "sp_interval/fi_interval/warm_up other than 1/1/0 cache self-attention, which this model's export "
                "(--schedule v1) can't: send 1/1/0, or serve an export made with tgate-export --schedule v2"
            )
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], size_multiple: int | None = None) -> Settings:
        """Settings from config.pbtxt; ``size_multiple`` (the loaded export's) wins over the stored one."""

        def number(key: str, kind: type, default: str | None = None) -> Any:
            text = params.get(key, default)
            if text is None:
                raise UsageError(f"config.pbtxt lacks the parameter {key!r}: regenerate it with tgate-triton")
            try:
                return kind(text)
            except ValueError:
                raise UsageError(f"config.pbtxt parameter {key!r} must be a {kind.__name__}, got {text!r}") from None

        settings = cls(
            steps=number("default_steps", int),
            gate_step=number("default_gate_step", int),
            guidance_scale=number("default_guidance_scale", float),
            height=number("default_height", int),
            width=number("default_width", int),
            max_steps=number("max_steps", int, str(DEFAULT_MAX_STEPS)),
            scheduler=params.get("scheduler", ""),
            size_multiple=size_multiple or number("size_multiple", int, "8"),
            max_pixels=number("max_pixels", int, "0"),
            max_batch=number("max_batch", int, str(DEFAULT_MAX_BATCH)),
            queue=params.get("queue", "model") or "model",
            schedule=params.get("schedule", "v1") or "v1",
            sp_interval=number("default_sp_interval", int, "1"),
            fi_interval=number("default_fi_interval", int, "1"),
            warm_up=number("default_warm_up", int, "0"),
        )
        settings.check()
        return settings


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[str]
    negative_prompts: list[str] | None
    seed: int
    steps: int
    gate_step: int
    guidance_scale: float
    height: int
    width: int
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 0

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TGatePipeline.__call__``."""
        return {
            "prompt": self.prompts,
            "negative_prompt": self.negative_prompts,
            "num_inference_steps": self.steps,
            "gate_step": self.gate_step,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            "sp_interval": self.sp_interval,
            "fi_interval": self.fi_interval,
            "warm_up": self.warm_up,
        }

    def check_args(self) -> tuple[list[str], list[str] | None, int, int, float, int, int]:
        """Arguments for ``TGatePipeline.check`` (the pipeline's own checks: readable tokens, static shapes)."""
        negatives = self.negative_prompts
        if negatives is not None and len(negatives) == 1 and self.batch > 1:
            negatives = negatives * self.batch
        return (self.prompts, negatives, self.steps, self.gate_step, self.guidance_scale, self.height, self.width)


def _decl(name: str) -> TensorDecl:
    return next(d for d in INPUTS if d.name == name)


def _strings(name: str, array: np.ndarray) -> list[str]:
    array = np.asarray(array)
    if array.dtype.kind not in _KINDS["TYPE_STRING"]:
        raise RequestError(f"{name} must be STRING (BYTES), got {array.dtype}")
    texts = []
    for value in array.reshape(-1):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"{name} is not valid UTF-8 ({exc.reason})") from exc
        texts.append(str(value))
    return texts


def _scalar(name: str, array: np.ndarray) -> Any:
    decl = _decl(name)
    array = np.asarray(array)
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
    if array.dtype.kind not in _KINDS[decl.data_type]:
        raise RequestError(f"{name} must be {decl.data_type[5:]}, got {array.dtype}")
    return array.reshape(-1)[0].item()


def parse_request(get: Callable[[str], np.ndarray | None], settings: Settings) -> GenerateRequest:
    """Read and check one request's inputs; ``get(name)`` returns the array or None when absent.

    Everything that depends only on the request and the settings is checked here, with the bounds of
    :mod:`tgate_trt.contract.limits`; what needs the loaded export (readable tokens, static graph
    shapes) is checked by ``TGatePipeline.check``, still before any graph runs.
    """

    def value(name: str, default: Any) -> Any:
        array = get(name)
        return default if array is None else _scalar(name, array)

    array = get("prompt")
    if array is None:
        raise RequestError("the input 'prompt' is required")
    prompts = _strings("prompt", array)
    limits.check_batch(len(prompts), settings.max_batch)
    if any(not p.strip() for p in prompts):
        raise RequestError("prompt is empty: pass a text describing the image")
    negative = get("negative_prompt")
    negatives = None if negative is None else _strings("negative_prompt", negative)
    if negatives is not None and len(negatives) not in (1, len(prompts)):
        raise RequestError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    try:
        steps = limits.check_steps(value("steps", settings.steps), settings.max_steps, "steps")
        height, width = limits.check_size(
            value("height", settings.height), value("width", settings.width), settings.size_multiple, settings.pixel_cap
        )
        gate_step = limits.check_gate(steps, value("gate_step", settings.gate_step))
        params = settings.params(
            gate_step,
            value("sp_interval", settings.sp_interval),
            value("fi_interval", settings.fi_interval),
            value("warm_up", settings.warm_up),
        )
        return GenerateRequest(
            prompts=prompts,
            negative_prompts=negatives,
            seed=limits.check_seed(value("seed", 0)),
            steps=steps,
            gate_step=gate_step,
            guidance_scale=limits.check_guidance(value("guidance_scale", settings.guidance_scale)),
            height=height,
            width=width,
            sp_interval=params.sp_interval,
            fi_interval=params.fi_interval,
            warm_up=params.warm_up,
        )
    except RequestError:
        raise
    except UsageError as exc:
        raise RequestError(str(exc)) from exc
