"""Models shipped as package data (the ``zoo``), found by name through the ``tgate_trt.zoo`` entry points.

Looking them up by entry point keeps the stage order one way: the zoo's models use the families (their
tokenizer builder, scheduler factory), and the families reach a zoo model only by its registered name, never
by importing the zoo. A third-party package can ship its own model the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

GROUP = "tgate_trt.zoo"


class ZooModel(Protocol):
    """What a zoo entry (a module or object) offers: verified weights and the run defaults of its exports."""

    WEIGHTS: Path
    DEFAULTS: dict[str, Any]

    def verify(self) -> dict[str, Any]:
        """Check every weight file against its recorded sha256 (a ``UserError`` if one differs); the record."""
        ...

    def load(self) -> Any:
        """The verified diffusers pipeline in float32."""
        ...


def zoo_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def zoo_model(name: str) -> ZooModel | None:
    """The zoo entry called ``name``, or None when no installed package registers one."""
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            model: ZooModel = ep.load()
            return model
    return None
