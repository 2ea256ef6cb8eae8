"""The ORT pipeline against the PyTorch reference, diffusers and the authors' package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tgate_trt import manifest as mf
from tgate_trt.export.reference import tgate_reference
from tgate_trt.families import build_tiny
from tgate_trt.runtime.engine import Engine
from tgate_trt.runtime.pipeline import TGatePipeline

STEPS = 10
PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def pipe(tiny_export: Path) -> TGatePipeline:
    return TGatePipeline.from_export(tiny_export)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize(("gate", "prompts"), [(3, PROMPTS[:1]), (7, PROMPTS)])
def test_matches_pytorch_reference(pipe: TGatePipeline, gate: int, prompts: list[str]) -> None:
    ours = pipe(prompts, num_inference_steps=STEPS, gate_step=gate, seed=11)
    ref = tgate_reference(
        build_tiny(),
        prompts,
        num_inference_steps=STEPS,
        gate_step=gate,
        generator=torch.Generator().manual_seed(11),
    )
    assert np.abs(ours.latents - ref.latents.numpy()).max() <= 1e-3
    assert np.abs(_pixels(ours.images) - _pixels(ref.images)).max() <= 2
    assert ours.calls[mf.PREGATE] == gate and ours.calls[mf.POSTGATE] == STEPS - gate
    assert ours.calls[mf.TEXT_ENCODER] == 1 and ours.calls[mf.VAE_DECODER] == 1


@pytest.mark.parametrize("gate", [4, 8])
def test_matches_authors_package(pipe: TGatePipeline, gate: int) -> None:
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    theirs = (
        tgate.TgateSDLoader(build_tiny())
        .tgate(
            PROMPTS,
            negative_prompt=[""] * 2,
            gate_step=gate,
            num_inference_steps=STEPS,
            sp_interval=1,
            fi_interval=1,
            warm_up=0,
            generator=torch.Generator().manual_seed(2),
            output_type="pil",
        )
        .images
    )
    ours = pipe(PROMPTS, num_inference_steps=STEPS, gate_step=gate, seed=2)
    assert np.abs(_pixels(ours.images) - _pixels(theirs)).max() <= 2


def test_gate_at_or_beyond_steps_is_diffusers_cfg(pipe: TGatePipeline) -> None:
    ref = build_tiny()(
        PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(4), output_type="latent"
    ).images
    for gate in (STEPS, STEPS + 5):
        ours = pipe(PROMPTS, num_inference_steps=STEPS, gate_step=gate, seed=4)
        assert np.abs(ours.latents - ref.numpy()).max() <= 1e-3
        assert ours.calls[mf.PREGATE] == STEPS and ours.calls[mf.POSTGATE] == 0


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_other_schedulers_run_and_differ(pipe: TGatePipeline, scheduler: str) -> None:
    ddim = pipe("a red circle", num_inference_steps=6, gate_step=3, seed=1)
    other = pipe("a red circle", num_inference_steps=6, gate_step=3, seed=1, scheduler=scheduler)
    assert np.isfinite(other.latents).all() and np.abs(other.latents - ddim.latents).max() > 1e-3


def test_engines_behind_one_interface(pipe: TGatePipeline) -> None:
    assert all(isinstance(e, Engine) for e in pipe.engines.values())
    assert set(pipe.engines) == set(mf.GRAPH_KEYS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": []}, "non-empty list"),
        ({"gate_step": 0}, "gate_step must be an integer >= 1"),
        ({"gate_step": -3}, "gate_step must be an integer >= 1"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer"),
        ({"height": 72}, "multiples of 16"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite"),
        ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt has 3 entries"),
        ({"scheduler": "pndm"}, "scheduler must be one of"),
    ],
)
def test_bad_inputs_are_refused(pipe: TGatePipeline, kwargs: dict, message: str) -> None:
    args = {"prompt": "a red circle", "num_inference_steps": 4, "gate_step": 2, **kwargs}
    before = pipe.engines[mf.TEXT_ENCODER].calls
    with pytest.raises(ValueError, match=message):
        pipe(**args)
    assert pipe.engines[mf.TEXT_ENCODER].calls == before  # refused before any graph ran


def test_tampered_export_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    target = copy / mf.UNET / f"{mf.PREGATE}.onnx"
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    with pytest.raises(mf.ManifestError, match="unet/unet_pregate.onnx does not match its sha256"):
        TGatePipeline.from_export(copy)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tgate_trt.runtime.cli", *args], capture_output=True, text=True)


def test_cli_writes_png_and_timing_table(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    proc = _run(str(tiny_export), "a red circle", "--steps", "8", "--gate", "3", "--seed", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for label in ("text encoder", "pre-gate steps", "post-gate steps", "VAE decoder", "total"):
        assert label in proc.stdout
    image = Image.open(out)
    assert image.size == (64, 64) and image.format == "PNG"
    expected = TGatePipeline.from_export(tiny_export)("a red circle", num_inference_steps=8, gate_step=3, seed=1)
    assert np.array_equal(np.asarray(image), np.asarray(expected.images[0]))


def test_cli_saves_final_latents(tiny_export: Path, tmp_path: Path) -> None:
    latents = tmp_path / "run.npy"
    args = [str(tiny_export), "a red circle", "--steps", "6", "--gate", "2", "--seed", "4"]
    proc = _run(*args, "--out", str(tmp_path / "a.png"), "--save-latents", str(latents))
    assert proc.returncode == 0, proc.stderr
    expected = TGatePipeline.from_export(tiny_export)("a red circle", num_inference_steps=6, gate_step=2, seed=4)
    saved = np.load(latents)
    assert saved.dtype == np.float32 and np.array_equal(saved, expected.latents)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "run.npy"]  # no temp file left
    bad = _run(*args, "--out", str(tmp_path / "b.png"), "--save-latents", str(tmp_path / "x.txt"))
    assert bad.returncode == 2 and "--save-latents must be a .npy path" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--out", "x.png"], "prompt is empty"),
        (["a", "--gate", "0"], "--gate must be an integer >= 1"),
        (["a", "--steps", "-1"], "--steps must be an integer"),
        (["a", "--width", "100"], "multiples of 16"),
        (["a", "--batch", "0"], "batch (number of prompts) must be an integer in 1.."),
        (["a", "--out", "x.jpg"], "--out must be a .png"),
    ],
)
def test_cli_errors(tiny_export: Path, args: list[str], message: str) -> None:
    proc = _run(str(tiny_export), *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_cli_missing_and_corrupt_export(tiny_export: Path, tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "missing"), "a")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    (copy / mf.VAE_DECODER / "model.onnx").write_bytes(b"garbage")
    proc = _run(str(copy), "a")
    assert proc.returncode == 2 and "vae_decoder/model.onnx does not match its sha256" in proc.stderr
