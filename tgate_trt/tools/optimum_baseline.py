"""optimum's ``ORTStableDiffusionPipeline`` on our exported standard parts: the standard ONNX deployment.

A T-GATE export has no plain ``unet/`` graph (the pre-/post-gate pair replaces it), so the standard
pipeline gets one exported by optimum from the same model, and everything else from our export: text
encoder and VAE decoder sessions, tokenizer, scheduler and default guidance. At gate >= steps our
pipeline draws the same image from the same seed (tested), so beside it optimum's pipeline measures
the standard deployment's cost, and T-GATE's saving over it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract.errors import OutputError, UserError
from ..contract.files import OutputDir
from ..contract.quiet import ort_log_level

SOURCE_NAME = "source.json"  # what the plain UNet was exported from, so a reused folder can be checked


class OptimumBaselineError(UserError, RuntimeError):
    """The baseline can't run on this export; the message says why and what would make it run."""


def check_export(manifest: mf.Manifest, pipeline: str = "optimum's ORTStableDiffusionPipeline") -> None:
    """optimum's pipelines (ORT and OpenVINO) are SD-1.x/2.x with CFG: refuse anything else before exporting."""
    family = manifest.model
    if family.family != "sd" or not family.cfg or manifest.dtype != "fp32":
        raise OptimumBaselineError(
            f"the {pipeline} baseline covers fp32 SD-1.x/2.x exports with CFG; this export "
            f"is {family.family} (cfg={family.cfg}) in {manifest.dtype}: re-export an SD model with --dtype fp32"
        )


def check_keep_folder(folder: Path | None, option: str, sources: Iterable[str | os.PathLike[str] | None] = ()) -> None:
    """A folder a baseline is exported into and kept (``--optimum-unet``, ``--optimum-intel-dir``): one an
    earlier run made (it holds ``source.json``; what it was made from is checked when it is read), or a
    new or empty folder in a writable place, outside what the command reads."""
    if folder is None:
        return
    for src in sources:
        if src is not None and Path(src).is_dir():
            real, src = folder.resolve(), Path(src).resolve()
            if real == src or src in real.parents or real in src.parents:
                raise OutputError(
                    f"{option} {folder} is, contains or lies inside {src}, which this command reads: "
                    "choose a folder outside it"
                )
    if (folder / SOURCE_NAME).is_file():
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(
            f"{option} {folder} is not empty and holds no {SOURCE_NAME} of an earlier baseline export: "
            "pass a new folder"
        )
    OutputDir(folder, option=option).check()


def plain_unet(model: str, random_weights: bool, folder: Path, opset: int = 18) -> Path:
    """``folder/unet/model.onnx``: optimum's standard UNet for ``model``, exported once and reused.

    A folder left by an earlier run is reused only if it was exported from the same model; anything else
    in the way is refused, never overwritten. The export is published only when complete (and the temp
    folder of an interrupted one is removed by the next), so nothing half-written looks finished.
    """
    from ..export.graphs import ExportOptions, export_plain_unet
    from ..families import resolve_model

    source = {"model": model, "random_weights": random_weights, "opset": opset}
    target = folder / mf.UNET / "model.onnx"
    if (folder / SOURCE_NAME).is_file():
        recorded = json.loads((folder / SOURCE_NAME).read_text())
        if recorded != source or not target.is_file():
            raise OptimumBaselineError(
                f"{folder} holds a UNet exported from {recorded}, not {source}: pass another folder or delete it"
            )
        return target
    check_keep_folder(folder, "the plain UNet's folder")
    with OutputDir(folder) as tmp:
        pipe = resolve_model(model, random_weights).pipe
        export_plain_unet(pipe, tmp, ExportOptions(opset=opset))
        del pipe
        (tmp / SOURCE_NAME).write_text(json.dumps(source) + "\n")
    return target


def load_pipeline(export: Path, unet: Path, threads: int = 0) -> Any:
    """optimum's pipeline from sessions: ``unet`` (a plain UNet graph) plus our export's other parts."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..families import make_scheduler

    manifest = mf.Manifest.load(export, verify=True)
    check_export(manifest)
    opts = ort.SessionOptions()
    opts.log_severity_level = ort_log_level()  # errors only; warnings too with --verbose
    if threads:
        opts.intra_op_num_threads = threads

    def session(path: Path) -> Any:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    config = json.loads((export / manifest.scheduler / "scheduler_config.json").read_text())
    return ORTStableDiffusionPipeline(
        unet_session=session(unet),
        text_encoder_session=session(export / manifest.graphs[mf.TEXT_ENCODER].file),
        vae_decoder_session=session(export / manifest.graphs[mf.VAE_DECODER].file),
        scheduler=make_scheduler(config),
        tokenizer=CLIPTokenizer.from_pretrained(str(export / manifest.text["tokenizer"])),
    )


def stage_timer(pipe: Any) -> Callable[[], dict[str, float]]:
    """Wrap each part's ``forward`` (ORT or OpenVINO: both call it from ``__call__``) to add up its wall time;
    returns a function that reads and resets.

    The UNet runs every step with CFG (no gate), so all of its time counts as pre-gate, as in (a) and (c).
    """
    times: dict[str, float] = {}
    parts = {"text_encoder": pipe.text_encoder, "pregate": pipe.unet, "vae_decoder": pipe.vae_decoder}
    for stage, part in parts.items():
        inner = part.forward

        def timed(*a: Any, _inner: Any = inner, _stage: str = stage, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                times[_stage] = times.get(_stage, 0.0) + time.perf_counter() - start

        part.forward = timed

    def read() -> dict[str, float]:
        out = dict(times)
        times.clear()
        return out

    return read


def generate(pipe: Any, manifest: mf.Manifest, prompt: str, steps: int, seed: int, height: int, width: int) -> Any:
    """One image as uint8 HxWx3, with the export's default guidance and torch noise from ``seed`` (as ours)."""
    import numpy as np
    import torch

    out = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=float(manifest.defaults["guidance_scale"]),
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.round(np.clip(out.images[0], 0, 1) * 255).astype(np.uint8)
