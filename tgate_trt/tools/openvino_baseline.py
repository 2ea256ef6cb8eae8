"""optimum-intel's ``OVStableDiffusionPipeline``: the plain OpenVINO deployment a CPU user would pick.

It is exported by optimum-intel itself, not made from our graphs: the same model (``resolve_model(model,
random_weights).pipe``) is saved as a diffusers folder, converted by ``OVStableDiffusionPipeline.from_pretrained(
folder, export=True, load_in_8bit=False, compile=False)`` (every part, text encoder, UNet and VAE, from PyTorch to
OpenVINO IR with fp32 weights and no weight compression) and saved with ``save_pretrained`` into a folder that
records its source, so a later run reuses it only for the same model. To run, it takes our export's scheduler,
is reshaped statically to batch 1 at one image size (optimum-intel's advice for speed) and compiled with the
given inference precision, the latency hint and a thread count. At f32 and gate >= steps it draws the image
our pipeline draws from the same seed (tested), so beside ours it measures the standard OpenVINO deployment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract.errors import UsageError
from ..contract.files import OutputDir
from ..engines.openvino import compile_config
from .optimum_baseline import (
    SOURCE_NAME,
    OptimumBaselineError,
    check_export,
    check_keep_folder,
    generate,
    stage_timer,
)

__all__ = [
    "PIPELINE",
    "PRECISIONS",
    "SOURCE_NAME",
    "check_export",
    "default_precision",
    "export_pipeline",
    "generate",
    "load_pipeline",
    "stage_timer",
]

PIPELINE = "optimum-intel OVStableDiffusionPipeline"
PRECISIONS = ("bf16", "f32")


def default_precision() -> str:
    """bf16 where the CPU computes it natively (OpenVINO's own CPU default there), else f32."""
    from ..engines.openvino import OpenVINOMissing, import_openvino, supports_bf16

    try:
        return "bf16" if supports_bf16(import_openvino().Core()) else "f32"
    except OpenVINOMissing:
        return "f32"


def _source(model: str, random_weights: bool) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "model": model,
        "random_weights": random_weights,
        "exporter": f"optimum-intel {version('optimum-intel')}",
        "load_in_8bit": False,
    }


def export_pipeline(model: str, random_weights: bool, folder: Path) -> Path:
    """``folder``: optimum-intel's OpenVINO pipeline for ``model``, exported once and reused.

    A folder from an earlier run is reused only if it was exported from the same model by the same
    optimum-intel; anything else in the way is refused, never overwritten. The export is published
    only when complete (the next run removes an interrupted one's temp folder), so nothing half-written
    looks finished.
    """
    source = _source(model, random_weights)
    if (folder / SOURCE_NAME).is_file():
        recorded = json.loads((folder / SOURCE_NAME).read_text())
        if recorded != source:
            raise OptimumBaselineError(
                f"{folder} holds a pipeline exported from {recorded}, not {source}: pass another folder or delete it"
            )
        return folder
    check_keep_folder(folder, "the OpenVINO pipeline's folder")
    from optimum.intel import OVStableDiffusionPipeline

    from ..families import resolve_model

    with OutputDir(folder) as tmp:  # the diffusers copy is staged inside: a killed run's is removed with it
        src = tmp / ".source"
        pipe = resolve_model(model, random_weights).pipe
        pipe.save_pretrained(src)
        del pipe
        ov_pipe = OVStableDiffusionPipeline.from_pretrained(
            str(src), export=True, load_in_8bit=False, compile=False, local_files_only=True
        )
        ov_pipe.save_pretrained(tmp)
        del ov_pipe
        shutil.rmtree(src)
        (tmp / SOURCE_NAME).write_text(json.dumps(source) + "\n")
    return folder


def load_pipeline(
    folder: Path, export: Path, precision: str, threads: int = 0, height: int = 512, width: int = 512
) -> Any:
    """The pipeline in ``folder`` with our export's scheduler, static at batch 1 and ``height`` x ``width``."""
    from optimum.intel import OVStableDiffusionPipeline

    from ..families import make_scheduler

    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not (folder / SOURCE_NAME).is_file():
        raise OptimumBaselineError(f"{folder} is not a pipeline folder made by export_pipeline")
    manifest = mf.Manifest.load(export, verify=False)  # only the scheduler config and defaults are read
    check_export(manifest, PIPELINE)
    config = json.loads((export / manifest.scheduler / "scheduler_config.json").read_text())
    ov_config = compile_config(precision, "CPU", threads)  # the settings our OpenVINO engines use
    pipe = OVStableDiffusionPipeline.from_pretrained(
        str(folder),  # a str: optimum-intel's check whether a folder is exported mishandles a Path
        scheduler=make_scheduler(config),
        ov_config=ov_config,
        compile=False,
        local_files_only=True,
    )
    pipe.reshape(batch_size=1, height=height, width=width, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)  # ours shows none either
    return pipe
