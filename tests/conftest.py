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
def shapes_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained ``shapes`` model, exported once per test session."""
    from tgate_trt.export.exporter import ExportRequest, run_export

    out = tmp_path_factory.mktemp("exports") / "shapes"
    run_export(ExportRequest("shapes", out))
    return out


@pytest.fixture(scope="session")
def v2_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One ``--schedule v2`` export per tiny variant (``tiny``, ``tiny-sd21``, ``tiny-sdxl``), made on first use."""
    from tgate_trt.export.exporter import ExportRequest, run_export

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp("v2-exports") / name
            run_export(ExportRequest(name, out, schedule="v2"))
            done[name] = out
        return done[name]

    return get


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
    from tgate_trt.families import build_tiny

    return build_tiny()


# One prompt per colour, every shape and position at least once (the judged checks of shapes).
CHECK_PROMPTS = [
    ("red", "circle", "left"),
    ("green", "square", "right"),
    ("blue", "triangle", "top"),
    ("yellow", "circle", "bottom"),
    ("purple", "square", "center"),
    ("red", "triangle", "right"),
]


@pytest.fixture(scope="session")
def check_prompts() -> Callable[[], list]:
    """The judged prompts of ``shapes`` as ``data.Spec`` (a function, so the import stays lazy)."""

    def specs() -> list:
        from tgate_trt.zoo.shapes import data

        return [data.Spec(c, s, p) for c, s, p in CHECK_PROMPTS]

    return specs
