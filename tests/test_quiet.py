"""Quiet by default, outputs under ``out/``, help for every option, native-size models (issue #17).

Real commands in a scratch working folder: what a user sees on the terminal, and where files land.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tgate_trt.cli.main import COMMANDS

# what third-party libraries print unless told not to (and what we print only on a problem)
NOISE = (
    "Multiple distributions found",
    "torch_dtype",
    "safety checker",
    "Warning",  # FutureWarning, DeprecationWarning, UserWarning, TracerWarning
    "onnxruntime:",  # ORT's log lines: [W:onnxruntime:...]
    "Loading pipeline components",
    "Traceback",
)
RESULT = re.compile(r"^\d+ steps, (gate \d+|no gate), seed \d+, \d+x\d+ -> \S+$")
TIMINGS = ("stage ", "---", "text encoder", "pre-gate steps", "post-gate steps", "VAE decoder", "total")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    env["COLUMNS"] = "200"  # one help text per line where it fits
    return env


def tgate(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tgate_trt.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


def _no_noise(proc: subprocess.CompletedProcess[str]) -> None:
    for text in (proc.stdout, proc.stderr):
        for noise in NOISE:
            assert noise not in text, f"{noise!r} printed:\n{text[-3000:]}"


def _stderr_lines(stderr: str) -> list[str]:
    """What stays on a terminal: progress bars redraw with \\r, so each redraw is its own segment."""
    return [s for s in re.split(r"[\r\n]+", stderr) if s.strip()]


def test_run_prints_only_the_bar_the_result_and_the_timings(tmp_path: Path, tiny_export: Path) -> None:
    proc = tgate("run", str(tiny_export), "a red circle", "--steps", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _no_noise(proc)
    assert all(s.startswith("denoise:") for s in _stderr_lines(proc.stderr)), proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert RESULT.match(lines[0]) and lines[0].endswith("-> out/image.png"), lines[0]
    assert len(lines) == 1 + len(TIMINGS) and all(
        line.startswith(label) for line, label in zip(lines[1:], TIMINGS, strict=True)
    ), proc.stdout
    assert (tmp_path / "out" / "image.png").is_file()  # the default --out, its folder made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    again = tgate("run", str(tiny_export), "a red circle", "--steps", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    _no_noise(again)
    notes = [s for s in _stderr_lines(again.stderr) if not s.startswith("denoise:")]
    assert notes == ["tgate-run: note: out/image.png exists and will be replaced"], again.stderr


def test_verbose_shows_the_third_party_notices(tmp_path: Path, tiny_export: Path) -> None:
    proc = tgate("run", str(tiny_export), "a red circle", "--steps", "2", "--verbose", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if len(importlib.metadata.packages_distributions().get("optimum", [])) > 1:
        assert "Multiple distributions found for package optimum" in proc.stderr, proc.stderr


def _options_without_help(text: str) -> list[str]:
    """The options (and positionals) of an argparse help text that have no help text."""
    entries: list[list[str]] = []
    section = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            section = line.endswith(":") and not line.startswith("usage:")
            continue
        if not section:
            continue  # usage continuation lines
        if re.match(r" {2}\S", line):  # an option's invocation, its help after two spaces or below
            head, _, rest = line.strip().partition("  ")
            entries.append([head, rest.strip()])
        elif entries:
            entries[-1][1] += " " + line.strip()
    assert entries, text
    return [head for head, help_ in entries if not help_]


@pytest.mark.parametrize("name", [*COMMANDS, "train"])
def test_help_of_every_command_documents_every_option(tmp_path: Path, name: str) -> None:
    if name == "train":  # scripts/train_shapes.py
        cmd = [sys.executable, "-m", "tgate_trt.zoo.shapes.train", "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    else:
        proc = tgate(name, "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    _no_noise(proc)
    assert _options_without_help(proc.stdout) == [], proc.stdout
    for flag in ("--debug", "--verbose"):
        assert flag in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "default"),
    [("run", "out/image.png"), ("bench", "out/bench"), ("eval", "out/eval"), ("analyze", "out/analyze")],
)
def test_help_says_the_default_output(tmp_path: Path, name: str, default: str) -> None:
    proc = tgate(name, "--help", cwd=tmp_path, timeout=120)
    out_help = next(line for line in proc.stdout.splitlines() if line.strip().startswith("--out"))
    index = proc.stdout.index(out_help)
    assert f"(default: {default})" in " ".join(proc.stdout[index:].split()[:40]), proc.stdout


def test_report_tools_write_under_out_by_default(tmp_path: Path, tiny_export: Path, shapes_export: Path) -> None:
    """tgate-analyze, tgate-bench and tgate-eval without --out: their reports land in ./out/<tool>."""
    analyze = tgate("analyze", "--model", "tiny", "--prompt", "a red circle", "--steps", "2", cwd=tmp_path)
    assert analyze.returncode == 0, analyze.stderr
    _no_noise(analyze)
    assert json.loads((tmp_path / "out" / "analyze" / "convergence.json").read_text())["steps"] == 2

    bench = tgate(
        "bench", "--model", "tiny", "--export", str(tiny_export), "--variants", "c", "--runs", "1",
        "--steps", "2", "--gate", "1", "--height", "64", "--width", "64", cwd=tmp_path,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    _no_noise(bench)
    assert (tmp_path / "out" / "bench" / "bench.json").is_file()

    evaluate = tgate(
        "eval", "--export", str(shapes_export), "--steps", "2", "--gates", "1", "--seeds-per-prompt", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    _no_noise(evaluate)
    assert (tmp_path / "out" / "eval" / "eval.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analyze", "bench", "eval"]


def test_shapes_draws_only_at_its_native_size(tmp_path: Path, shapes_export: Path) -> None:
    """shapes was trained at 64x64 (at 96x96 it draws two shapes): its export records that and every
    entry point refuses another size, in one line, before any graph runs."""
    from tgate_trt import manifest as mf
    from tgate_trt.contract.errors import UsageError
    from tgate_trt.export.exporter import ExportError, ExportRequest, check_request
    from tgate_trt.runtime.pipeline import TGatePipeline

    manifest = mf.Manifest.load(shapes_export, verify=False)
    assert manifest.defaults["native_size"] == [64, 64] and manifest.native_size == (64, 64)

    proc = tgate("run", str(shapes_export), "a red circle", "--height", "96", "--width", "96", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tgate-run: error: shapes draws only at its native size 64x64 (it was trained at that size), got 96x96: "
        "leave --height and --width unset"
    ]
    assert list(tmp_path.iterdir()) == []

    pipe = TGatePipeline.from_export(shapes_export)
    with pytest.raises(UsageError, match="native size 64x64"):
        pipe("a red circle", num_inference_steps=2, gate_step=1, height=96, width=96)
    with pytest.raises(UsageError, match="native size 64x64"):
        pipe("a red circle", num_inference_steps=2, gate_step=1, height=64, width=128)
    assert pipe("a red circle", num_inference_steps=2, gate_step=1).images[0].size == (64, 64)

    with pytest.raises(ExportError, match="native size 64x64"):
        check_request(ExportRequest("shapes", tmp_path / "shapes96", height=96))
    check_request(ExportRequest("shapes", tmp_path / "shapes64", height=64, width=64))


def test_an_export_without_native_size_takes_any_size(tiny_export: Path) -> None:
    from tgate_trt import manifest as mf

    manifest = mf.Manifest.load(tiny_export, verify=False)
    assert "native_size" not in manifest.defaults and manifest.native_size is None
    manifest.check_native_size(96, 80)
