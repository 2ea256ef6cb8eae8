"""optimum's ORTStableDiffusionPipeline on our exported text encoder, VAE, tokenizer and scheduler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tgate_trt import manifest as mf
from tgate_trt.runtime import optimum_baseline as ob
from tgate_trt.runtime.pipeline import TGatePipeline


@pytest.fixture(scope="module")
def plain_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ob.plain_unet("tiny", True, tmp_path_factory.mktemp("optimum-unet"))


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
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with pytest.raises(ob.OptimumBaselineError, match="delete it"):
        ob.plain_unet("tiny-sd21", False, folder)


def test_refuses_exports_the_standard_pipeline_does_not_cover(model_export: Callable[[str], Path]) -> None:
    with pytest.raises(ob.OptimumBaselineError, match="SD-1.x/2.x"):
        ob.check_export(mf.Manifest.load(model_export("tiny-sdxl")))
