"""tgate-trt: T-GATE (arXiv 2404.02747) compiled into deployable graphs, engines, a runtime and Triton."""

import logging
from typing import Any


class _OptimumNamespaceNotice(logging.Filter):
    """Drop diffusers' import-time warning that several distributions (optimum, optimum-onnx, optimum-intel)
    provide the ``optimum`` namespace: they are meant to, and it shows on every command otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Multiple distributions found for package optimum." not in record.getMessage()


logging.getLogger("diffusers.utils.import_utils").addFilter(_OptimumNamespaceNotice())


def load_pipeline(name: str, random_weights: bool = False) -> Any:
    """The diffusers pipeline of a preset (``sd15``, ``sdxl``, ...; from the hub cache) or a built-in model
    (``tiny``, ``tiny-*``, ``shapes``; no download), or of a local folder: the PyTorch model users compare
    our graphs against. ``random_weights`` builds a preset's architecture with seeded random weights."""
    from .families import resolve_model

    return resolve_model(name, random_weights).pipe
