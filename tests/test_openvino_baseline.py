"""optimum-intel's OVStableDiffusionPipeline, exported by optimum-intel from the same tiny model as our export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the OpenVINO baseline needs openvino")
pytest.importorskip("optimum.intel", reason="the OpenVINO baseline is optimum-intel's pipeline")

from tgate_trt import manifest as mf  # noqa: E402
from tgate_trt.contract.errors import OutputError  # noqa: E402
from tgate_trt.runtime.pipeline import TGatePipeline  # noqa: E402
from tgate_trt.tools import openvino_baseline as ovb  # noqa: E402
from tgate_trt.tools.optimum_baseline import OptimumBaselineError  # noqa: E402

PROMPT, STEPS = "a red circle", 5


@pytest.fixture(scope="module")
def ov_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ovb.export_pipeline("tiny", True, tmp_path_factory.mktemp("ov-parent") / "ov")


@pytest.fixture(scope="module")
def our_image(tiny_export: Path) -> np.ndarray:
    ours = TGatePipeline.from_export(tiny_export)(
        PROMPT, num_inference_steps=STEPS, gate_step=STEPS, seed=3, height=64, width=64
    )
    return np.asarray(ours.images[0]).astype(int)


def test_f32_draws_our_no_gate_image(tiny_export: Path, ov_folder: Path, our_image: np.ndarray) -> None:
    """Same seed and steps: optimum-intel's own export of the model, at f32, equals ours at gate >= steps.

    Its text encoder, UNet and VAE are converted by optimum-intel from the PyTorch model, not from our
    graphs, so equality is up to float rounding (measured: mean 1e-4, at most 1 level of 255).
    """
    manifest = mf.Manifest.load(tiny_export, verify=False)
    pipe = ovb.load_pipeline(ov_folder, tiny_export, "f32", height=64, width=64)
    read = ovb.stage_timer(pipe)
    theirs = ovb.generate(pipe, manifest, PROMPT, steps=STEPS, seed=3, height=64, width=64).astype(int)
    times = read()
    assert theirs.shape == our_image.shape == (64, 64, 3)
    assert np.abs(theirs - our_image).mean() < 0.05 and np.abs(theirs - our_image).max() <= 2
    assert set(times) == {"text_encoder", "pregate", "vae_decoder"} and min(times.values()) > 0
    # another seed draws another picture, so the equality above is not trivial
    other = ovb.generate(pipe, manifest, PROMPT, steps=STEPS, seed=4, height=64, width=64).astype(int)
    assert np.abs(other - our_image).mean() > 10


def test_precision_and_threads_reach_the_compiled_model(
    tiny_export: Path, ov_folder: Path, our_image: np.ndarray
) -> None:
    """bf16 is asked of the CPU plugin where the CPU has it; the image then stays close, not equal."""
    import openvino as ov

    if ovb.default_precision() != "bf16":
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 whatever is asked")
    manifest = mf.Manifest.load(tiny_export, verify=False)
    pipe = ovb.load_pipeline(ov_folder, tiny_export, "bf16", threads=1, height=64, width=64)
    assert pipe.unet.request.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert pipe.unet.request.get_property("INFERENCE_NUM_THREADS") == 1
    image = ovb.generate(pipe, manifest, PROMPT, steps=STEPS, seed=3, height=64, width=64).astype(int)
    assert np.abs(image - our_image).mean() < 3  # measured 0.6; another seed is ~40 away


def test_folder_is_reused_only_for_its_model(ov_folder: Path, tmp_path: Path) -> None:
    xml = ov_folder / "unet" / "openvino_model.xml"
    stamp = xml.stat().st_mtime_ns
    assert ovb.export_pipeline("tiny", True, ov_folder) == ov_folder and xml.stat().st_mtime_ns == stamp
    assert not [p for p in ov_folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with pytest.raises(OptimumBaselineError, match="delete it"):
        ovb.export_pipeline("tiny-sd21", False, ov_folder)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):  # never overwritten
        ovb.export_pipeline("tiny", True, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_refuses_unknown_precision(tiny_export: Path, ov_folder: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        ovb.load_pipeline(ov_folder, tiny_export, "fp16", height=64, width=64)
