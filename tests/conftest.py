"""Shared fixtures: one real export of the tiny model per test session."""

from __future__ import annotations

import os
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


@pytest.fixture
def tiny_pipe():
    from tgate_trt.export.models import build_tiny

    return build_tiny()
