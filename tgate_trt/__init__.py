"""tgate-trt: T-GATE (arXiv 2404.02747) compiled into deployable graphs, engines, a runtime and Triton."""

from typing import Any

from .contract import quiet

quiet.install()  # third-party notices hidden before diffusers or optimum is imported (--verbose shows them)


def load_pipeline(name: str, random_weights: bool = False) -> Any:
    """The diffusers pipeline of a preset (``sd15``, ``sdxl``, ...; from the hub cache) or a built-in model
    (``tiny``, ``tiny-*``, ``shapes``; no download), or of a local folder: the PyTorch model users compare
    our graphs against. ``random_weights`` builds a preset's architecture with seeded random weights."""
    from .families import resolve_model

    return resolve_model(name, random_weights).pipe
