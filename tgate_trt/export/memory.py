"""How much memory a generation needs against image size, measured once at export.

The runtime's pixel cap comes from this record, not from a rule: :func:`measure_memory` runs the exported
graphs in ONNX Runtime on the CPU at three small sizes, each in a fresh subprocess (so the peak RSS is the
run's alone), and fits ``peak bytes = a + b*P + c*P**2`` over the pixel count ``P``; ``c`` is
self-attention's score matrices, which grow with the square of the tokens (on ``tiny`` it is most of the
peak from 128x128 up). The budget is not fixed here: :func:`tgate_trt.contract.limits.default_max_pixels`
solves the fit against the memory of the machine that loads the export (cgroup-aware), since exports are
often made on a workstation and served in a container.

What one subprocess runs is a fresh pipeline's first generation as the runtime drives it by default: the
graphs share one ORT CPU arena (``cpu_arena="shared"``) and the UNet variants one copy of the weights, so the
peak above the loaded weights is that of the largest graph, not a sum. The UNet variant that computes every
attention at the CFG batch bounds the others (each of them computes a subset, at that batch or half of it),
so it runs twice (ONNX Runtime allocates a planned memory pattern on a graph's second call at a shape), then
the VAE decoder once. Measured on ``tiny`` at 512x512 above the loaded sessions: one arena per session peaks
at 6.5 GiB, a shared arena at 4.2 GiB. The text encoder is left out: its peak doesn't depend on the image
size (the reserve covers it). The subprocess uses ONNX Runtime directly (export does not import the runtime).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .. import manifest as mf

LATENT_SIDES = (16, 24, 32)  # latent pixels per side: 128..256 on SD's VAE, quick on any model
UNET_RUNS = 2  # the second call at a shape allocates ONNX Runtime's planned memory pattern
TIMEOUT_S = 900.0  # one size of a full-size model loads its graphs in ~10 s each
METHOD = "ORT CPU, one shared arena, batch 1: the first UNet variant twice, then vae_decoder; peak RSS minus loaded"


def record_memory(root: Path, manifest: mf.Manifest) -> None:
    """Measure and store ``defaults.memory``; where that fails (not Linux, a crashed run) the export stays
    valid without it and the runtime keeps the old rule (4x the native size), which a warning says."""
    try:
        manifest.defaults["memory"] = measure_memory(root, manifest)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"no memory record (the pixel cap stays 4x the native size): {exc}", stacklevel=2)


def measure_memory(root: Path, manifest: mf.Manifest, sides: tuple[int, ...] = LATENT_SIDES) -> dict[str, Any]:
    """The ``defaults.memory`` record of an export: the sizes measured, their peaks and the fit."""
    start = time.perf_counter()
    sizes = square_sizes(manifest, sides)
    peaks = [measure_peak(root, manifest, h, w) for h, w in sizes]
    pixels = [h * w for h, w in sizes]
    coef = fit(pixels, peaks)
    if coef["b"] <= 0 and coef["c"] <= 0:
        raise RuntimeError(f"the peaks {peaks} do not grow with the sizes {sizes}")
    native = int(manifest.defaults["height"]) * int(manifest.defaults["width"])
    return {
        "method": METHOD,
        "graphs": measured_graphs(manifest),
        "sizes": [[h, w] for h, w in sizes],
        "peak_bytes": peaks,
        "fit": coef,
        "bytes_per_pixel": round(predict(coef, native) / native, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def square_sizes(manifest: mf.Manifest, sides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Square image sizes whose latents are ``sides`` rounded to what the graphs take, all distinct."""
    step, factor = int(manifest.latent["multiple"]), int(manifest.latent["vae_scale_factor"])
    out: list[int] = []
    for side in sides:
        latent = max(step, round(side / step) * step)
        while latent in out:
            latent += step
        out.append(latent)
    return [(s * factor, s * factor) for s in out]


def fit(pixels: list[int], peaks: list[int]) -> dict[str, float]:
    """``a + b*P + c*P**2`` by least squares, with no coefficient below zero: where the free fit has one
    (a negative ``a`` from noise at small sizes, a ``c`` that bends down and would promise unbounded room),
    the simpler forms are tried in turn (through the origin, a line, a line through the origin). On ``tiny``
    the origin form predicts 320x320 within 3% and, unlike the free fit, stays positive at 64x64."""
    import numpy as np

    x, y = np.asarray(pixels, np.float64), np.asarray(peaks, np.float64)
    columns = {"a": np.ones_like(x), "b": x, "c": x**2}
    for terms in (("a", "b", "c"), ("b", "c"), ("a", "b"), ("b",)):
        solved = np.linalg.lstsq(np.stack([columns[t] for t in terms], 1), y, rcond=None)[0]
        coef = {"a": 0.0, "b": 0.0, "c": 0.0, **{t: float(v) for t, v in zip(terms, solved, strict=True)}}
        if min(coef.values()) >= 0:
            return coef
    return coef  # peaks that fall with size: the caller refuses the record


def predict(coef: dict[str, float], pixels: int) -> float:
    """Predicted peak bytes of a generation at ``pixels`` pixels per image."""
    return coef["a"] + coef["b"] * pixels + coef["c"] * pixels**2


def measure_peak(root: Path, manifest: mf.Manifest, height: int, width: int) -> int:
    """Peak bytes above the loaded sessions of one generation at ``height`` x ``width``, in a subprocess."""
    job = {"graphs": [_graph_job(root, manifest, key, height, width) for key in measured_graphs(manifest)]}
    cmd = [sys.executable, "-m", __name__]
    done = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"measuring memory at {height}x{width} failed: {tail}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak"])


def measured_graphs(manifest: mf.Manifest) -> list[str]:
    """The UNet variant that computes every attention at the CFG batch (the first), and the VAE decoder."""
    return [next(iter(manifest.variants)), mf.VAE_DECODER]


def _graph_job(root: Path, manifest: mf.Manifest, key: str, height: int, width: int) -> dict[str, Any]:
    from .onnx_io import random_feeds

    factor = int(manifest.latent["vae_scale_factor"])
    feeds = random_feeds(manifest, key, height // factor, width // factor)
    return {
        "key": key,
        "file": str(root / manifest.graphs[key].file),
        "inputs": {name: [list(a.shape), a.dtype.name] for name, a in feeds.items()},
        "runs": 1 if key == mf.VAE_DECODER else UNET_RUNS,
    }


def _status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) * 1024
    return out


def _run_job(job: dict[str, Any]) -> dict[str, int]:
    """In the subprocess: load the graphs on one shared arena, reset the peak, run them as a generation would."""
    import numpy as np
    import onnxruntime as ort

    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, None)
    sessions = []
    for g in job["graphs"]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.use_env_allocators", "1")
        sessions.append(ort.InferenceSession(g["file"], opts, providers=["CPUExecutionProvider"]))
    with contextlib.suppress(OSError):  # the peak so far (loading, optimising) is not the run's: reset it
        Path("/proc/self/clear_refs").write_text("5")  # (Linux >= 4.0)
    loaded = _status()["VmRSS"]
    rng = np.random.default_rng(0)
    for g, session in zip(job["graphs"], sessions, strict=True):
        feeds = {name: rng.standard_normal(shape).astype(dtype) for name, (shape, dtype) in g["inputs"].items()}
        for _ in range(g["runs"]):
            session.run(None, feeds)
    return {"peak": _status()["VmHWM"] - loaded, "loaded": loaded}


if __name__ == "__main__":
    print(json.dumps(_run_job(json.loads(sys.stdin.read()))))
