"""optimum's ORTStableDiffusionPipeline on our exported text encoder, VAE, tokenizer and scheduler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tgate_trt import manifest as mf
from tgate_trt.contract.errors import OutputError
from tgate_trt.contract.files import MARKER
from tgate_trt.runtime.pipeline import TGatePipeline
from tgate_trt.tools import optimum_baseline as ob


@pytest.fixture(scope="module")
def plain_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("optimum-unet")
    (parent / ".unet-cache.tmp-killed").mkdir()  # what a killed export leaves: the next export removes it
    return ob.plain_unet("tiny", True, parent / "unet-cache")


def test_optimum_pipeline_draws_our_no_gate_image(tiny_export: Path, plain_unet: Path) -> None:
    """Same seed, same steps: the standard pipeline on our parts equals ours at gate >= steps."""
    manifest = mf.Manifest.load(tiny_export)
    pipe = ob.load_pipeline(tiny_export, plain_unet)
    read = ob.stage_timer(pipe)
    theirs = ob.generate(pipe, manifest, "a red circle", steps=5, seed=3, height=64, width=64)
    times = read()
    ours = TGatePipeline.from_export(tiny_export)(
        "a red circle", num_inference_steps=5, gate_step=5, seed=3, height=64, width=64
    )
    mine = np.asarray(ours.images[0])
    assert theirs.shape == mine.shape == (64, 64, 3)
    assert np.abs(theirs.astype(int) - mine.astype(int)).max() <= 1
    assert set(times) == {"text_encoder", "pregate", "vae_decoder"} and min(times.values()) > 0
    # the different seed gives a different picture, so the equality above is not trivial
    other = ob.generate(pipe, manifest, "a red circle", steps=5, seed=4, height=64, width=64)
    assert np.abs(other.astype(int) - mine.astype(int)).max() > 1


def test_plain_unet_folder_is_reused_only_for_its_model(plain_unet: Path) -> None:
    folder = plain_unet.parent.parent
    stamp = plain_unet.stat().st_mtime_ns
    assert ob.plain_unet("tiny", True, folder) == plain_unet and plain_unet.stat().st_mtime_ns == stamp
    assert (plain_unet.parent / "config.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temp folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the killed run's temp folder removed
    with pytest.raises(ob.OptimumBaselineError, match="delete it"):
        ob.plain_unet("tiny-sd21", False, folder)
    foreign = folder.parent / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):  # never overwritten
        ob.plain_unet("tiny", True, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_refuses_exports_the_standard_pipeline_does_not_cover(model_export: Callable[[str], Path]) -> None:
    with pytest.raises(ob.OptimumBaselineError, match="SD-1.x/2.x"):
        ob.check_export(mf.Manifest.load(model_export("tiny-sdxl")))
