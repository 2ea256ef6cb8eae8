"""``config.pbtxt`` for the served pipeline, written as protobuf text from :mod:`.contract`.

Written by hand (no protobuf dependency at generation time); the tests parse it back with Triton's own
``model_config_pb2`` so a malformed file can't pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..contract.errors import UsageError
from .contract import INPUTS, OUTPUTS, TensorDecl

KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
FORMS = ("model", "backend")  # model.py in the version folder, or `backend: "tgate"`
BACKEND_NAME = "tgate"


def quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensor(decl: TensorDecl) -> str:
    dims = ", ".join(str(d) for d in decl.dims)
    optional = " optional: true" if decl.optional else ""
    return f"  {{ name: {quote(decl.name)} data_type: {decl.data_type} dims: [ {dims} ]{optional} }}"


def render_config(
    name: str,
    *,
    form: str = "model",
    kind: str = "cpu",
    instances: int = 1,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """The model configuration: one request is one image, so no batching dimension (max_batch_size 0)."""
    if form not in FORMS:
        raise UsageError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if instances < 1:
        raise UsageError(f"instances must be >= 1, got {instances}")
    backend = "python" if form == "model" else BACKEND_NAME
    lines = [
        f"name: {quote(name)}",
        f"backend: {quote(backend)}",
        "max_batch_size: 0",
        "input [",
        ",\n".join(_tensor(d) for d in INPUTS),
        "]",
        "output [",
        ",\n".join(_tensor(d) for d in OUTPUTS),
        "]",
        f"instance_group [ {{ kind: {KINDS[kind]} count: {instances} }} ]",
    ]
    params = dict(parameters or {})
    if params:
        lines.append("parameters [")
        lines.append(
            ",\n".join(
                f"  {{ key: {quote(key)} value: {{ string_value: {quote(value)} }} }}"
                for key, value in sorted(params.items())
            )
        )
        lines.append("]")
    return "\n".join(lines) + "\n"
