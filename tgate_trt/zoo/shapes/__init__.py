"""``shapes``: a small text-to-image model of SD-1.5's shape, trained by this project and shipped with it.

It is the embedded default model: it loads offline in seconds and draws the coloured shape a caption asks
for, so T-GATE's effect on image quality can be measured (``tgate-eval``) without downloading weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...contract.errors import UserError
from ...manifest import sha256_file
from .data import SIZE

WEIGHTS = Path(__file__).parent / "weights"
WEIGHTS_RECORD = "weights.json"  # sha256 of every file, the command that trained it, timings
# Run defaults recorded in the manifest of a shapes export. Guidance 7.5 (SD's) over-saturates this small
# model; benchmarks/quality compares the two on the full prompt set. It was trained at 64x64 only (data.SIZE)
# and draws wrong images at other sizes (two shapes at 96x96): exports and runs take only its native size.
DEFAULTS: dict[str, Any] = {"guidance_scale": 4.0, "native_size": [SIZE, SIZE]}


class ShapesWeightsError(UserError, ValueError):
    """The shipped weights are missing or differ from their recorded hashes."""


def record_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != WEIGHTS_RECORD
    }


def verify(folder: Path = WEIGHTS) -> dict[str, Any]:
    """Check every file against the record; returns the record."""
    record_path = folder / WEIGHTS_RECORD
    if not record_path.is_file():
        raise ShapesWeightsError(
            f"{record_path} is missing: the shapes weights are not installed; reinstall tgate-trt or retrain "
            "them with scripts/train_shapes.py"
        )
    record = json.loads(record_path.read_text())
    actual = record_hashes(folder)
    if set(actual) != set(record["files"]):
        raise ShapesWeightsError(
            f"{folder} holds files {sorted(actual)} but the record lists {sorted(record['files'])}"
        )
    for rel, digest in record["files"].items():
        if actual[rel] != digest:
            raise ShapesWeightsError(f"{folder / rel} was modified: sha256 {actual[rel]}, recorded {digest}")
    return record


def load(folder: Path = WEIGHTS) -> Any:
    """The verified pipeline in float32 (the weights are stored in fp16 to keep the package small)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from ...contract import quiet

    verify(folder)
    # No torch_dtype: diffusers passes it on to transformers, which says it is deprecated; the models load
    # in float32 by default, and .to() below makes sure. The loading bar (a second) is shown with --verbose.
    bars = diffusers_logging.is_progress_bar_enabled()
    if not quiet.is_verbose():
        diffusers_logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
