"""Triton Inference Server stage: model repository generator, the served model, and a local server.

Nothing here imports Triton at module level; ``model.py`` runs only inside Triton's Python stub.
"""

from .contract import INPUTS, OUTPUTS, GenerateRequest, RequestError, Settings, parse_request
from .repository import RepoOptions, RepositoryError, generate_repository, install_backend

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "GenerateRequest",
    "RepoOptions",
    "RepositoryError",
    "RequestError",
    "Settings",
    "generate_repository",
    "install_backend",
    "parse_request",
]
