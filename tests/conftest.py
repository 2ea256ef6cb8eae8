"""Shared fixtures: one real export of the tiny model (and of each tiny variant used) per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tgate_trt.export.exporter import ExportRequest, run_export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    run_export(ExportRequest("tiny", out))
    return out


@pytest.fixture(scope="session")
def model_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One export per tiny variant (``tiny-sdxl``, ``tiny-lcm``, ...) per test session, made on first use."""
    from tgate_trt.export.exporter import ExportRequest, run_export

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp("family-exports") / name
            run_export(ExportRequest(name, out))
            done[name] = out
        return done[name]

    return get


@pytest.fixture
def tiny_pipe():
    from tgate_trt.export.models import build_tiny

    return build_tiny()
