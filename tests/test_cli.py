"""``tgate-export`` as a user runs it: errors before any work, atomic output, killed exports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgate_trt.export.cli import main
from tgate_trt.families import ModelLoadError, resolve_model


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 30  # refused before any export work
    return capsys.readouterr().err


def test_unknown_preset(capsys, tmp_path: Path) -> None:
    assert "unknown model 'sd99'" in _err(capsys, ["--model", "sd99", "--out", str(tmp_path / "o")])


def test_missing_path(capsys, tmp_path: Path) -> None:
    err = _err(capsys, ["--model", str(tmp_path / "nope" / "model"), "--out", str(tmp_path / "o")])
    assert "does not exist" in err
    err = _err(capsys, ["--model", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "o")])
    assert "does not exist" in err


def test_folder_that_is_not_a_pipeline(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "notsd"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    assert "not a diffusers pipeline folder" in _err(capsys, ["--model", str(folder), "--out", str(tmp_path / "o")])
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"]}')
    assert "missing component(s)" in _err(capsys, ["--model", str(folder), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp8"], "--dtype must be one of fp32, fp16"),
        (["--opset", "12"], "--opset must be between 18 and 20"),
        (["--height", "70"], "--height must be a multiple of 16"),
        (["--width", "-64"], "--width must be an integer >= 1"),
    ],
)
def test_bad_options(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    assert message in _err(capsys, ["--model", "tiny", "--out", str(tmp_path / "o"), *args])
    assert not (tmp_path / "o").exists()


def test_random_weights_needs_a_preset(capsys, tmp_path: Path) -> None:
    assert "--random-weights needs a preset" in _err(
        capsys, ["--model", "org/name", "--random-weights", "--out", str(tmp_path / "o")]
    )


def test_non_empty_out_needs_force(capsys, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "pass --force" in _err(capsys, ["--model", "tiny", "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"


def test_unreachable_hub_id_says_to_pass_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("sd15", "someone/some-model"):
        with pytest.raises(ModelLoadError, match="Pass a local diffusers folder"):
            resolve_model(model)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tgate_trt.export.cli", *args]


def test_cli_export_and_force_replace(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "old.txt").write_text("old")
    refused = subprocess.run(_cli("--model", "tiny", "--out", str(out), "--force"), capture_output=True, text=True)
    assert refused.returncode == 2 and "not an output of tgate-trt" in refused.stderr  # not ours: kept
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    first = subprocess.run(_cli("--model", "tiny", "--out", str(out)), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (out / "old.txt").write_text("old")  # a stray file in our previous output
    proc = subprocess.run(_cli("--model", "tiny", "--out", str(out), "--force"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unet_postgate" in proc.stdout and "max abs diff" in proc.stdout
    assert (out / "manifest.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp or old folder left


def test_sigterm_midway_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--model", "tiny", "--out", str(out)), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/*")):
        time.sleep(0.05)  # wait until the export is writing into its temp folder
    assert proc.poll() is None, "export finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_tgate_command_dispatches_to_the_stage_clis(tmp_path: Path) -> None:
    """``tgate SUB`` is the stage's own CLI: same arguments, same one-line errors as ``tgate-SUB``."""
    from tgate_trt.cli.main import COMMANDS

    top = subprocess.run([sys.executable, "-m", "tgate_trt.cli.main", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS)
    args = [str(tmp_path / "missing"), "a red circle", "--out", str(tmp_path / "a.png")]
    via_tgate = subprocess.run(
        [sys.executable, "-m", "tgate_trt.cli.main", "run", *args], capture_output=True, text=True
    )
    direct = subprocess.run([sys.executable, "-m", "tgate_trt.runtime.cli", *args], capture_output=True, text=True)
    assert via_tgate.returncode == direct.returncode == 2 and via_tgate.stderr == direct.stderr
    unknown = subprocess.run([sys.executable, "-m", "tgate_trt.cli.main", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown subcommand 'nope'" in unknown.stderr
    for name in COMMANDS:
        help_ = subprocess.run(
            [sys.executable, "-m", "tgate_trt.cli.main", name, "--help"], capture_output=True, text=True
        )
        assert help_.returncode == 0 and "usage:" in help_.stdout, (name, help_.stderr)


def test_load_pipeline_returns_the_diffusers_reference() -> None:
    import tgate_trt

    pipe = tgate_trt.load_pipeline("tiny")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.cross_attention_dim == 32
