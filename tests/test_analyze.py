"""tgate-analyze: real convergence runs on the tiny model, the report's invariants, and CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tgate_trt.tools.analyze import JSON_NAME, PNG_NAME, main, suggest_gate

STEPS = 8
TINY_ATTN2 = 7


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("analyze")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle on the left\n\n   a blue square  \n")
    assert main(["--model", "tiny", "--prompts", str(prompts), "--steps", str(STEPS), "--out", str(out)]) == 0
    return out, json.loads((out / JSON_NAME).read_text())


def test_curves_per_layer(report: tuple[Path, dict]) -> None:
    _, data = report
    assert data["model"] == "tiny" and data["steps"] == STEPS
    assert data["prompts"] == ["a red circle on the left", "a blue square"]  # blank lines skipped, stripped
    assert len(data["layers"]) == TINY_ATTN2 and all(n.endswith(".attn2") for n in data["layers"])
    assert list(data["curves"]) == data["layers"]
    assert data["step_axis"] == list(range(1, STEPS))
    for curve in data["curves"].values():
        assert len(curve) == STEPS - 1
        assert all(math.isfinite(v) and v >= 0 for v in curve)
    assert any(v > 0 for curve in data["curves"].values() for v in curve)  # the outputs do change
    for k, value in enumerate(data["mean"]):
        expected = sum(c[k] for c in data["curves"].values()) / TINY_ATTN2
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_suggested_gate_meets_its_definition(report: tuple[Path, dict]) -> None:
    _, data = report
    mean, thr, gate = data["mean"], data["threshold"], data["suggested_gate"]
    assert thr == 0.05 and data["gate"] == gate  # no --gate: the suggestion is marked
    below = [v < thr for v in mean]  # below[k] is about step k + 1
    if gate is None:
        assert not below[-1]
    else:
        assert 1 <= gate <= STEPS - 1
        assert all(below[gate - 1 :])  # stays below from the gate on ...
        assert gate == 1 or not below[gate - 2]  # ... and the step before it is not below (first such)


def test_plot_is_a_png(report: tuple[Path, dict]) -> None:
    out, _ = report
    with Image.open(out / PNG_NAME) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0
        img.verify()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_rerun_replaces_the_report_only_with_force(tmp_path: Path) -> None:
    """The folder is shared (here it holds the prompt file): --force replaces the two report files only."""
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "prompts.txt").write_text("a cat\n")
    args = ["--model", "tiny", "--prompts", str(out / "prompts.txt"), "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    before = (out / JSON_NAME).read_bytes()
    assert main([*args[:-2], "--steps", "3", "--out", str(out)]) == 2  # an earlier report: not without --force
    assert (out / JSON_NAME).read_bytes() == before
    assert main([*args[:-2], "--steps", "3", "--out", str(out), "--force"]) == 0
    assert json.loads((out / JSON_NAME).read_text())["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [JSON_NAME, PNG_NAME, "prompts.txt"]


def test_suggest_gate_rule() -> None:
    assert suggest_gate([0.5, 0.2, 0.04, 0.03], 0.05) == 3
    assert suggest_gate([0.5, 0.01, 0.2, 0.03, 0.01], 0.05) == 4  # a dip before a rise doesn't count
    assert suggest_gate([0.01, 0.02], 0.05) == 1
    assert suggest_gate([0.01, 0.2], 0.05) is None
    assert suggest_gate([0.5, 0.05], 0.05) is None  # "below" is strict


def test_single_prompt_gate_marker_and_batching(tmp_path: Path) -> None:
    """--gate is what the report marks; per-prompt seeds make results independent of --batch-size."""
    runs = {}
    for bs in (1, 2):
        out = tmp_path / f"bs{bs}"
        prompts = tmp_path / "p.txt"
        prompts.write_text("a cat\na dog\n")
        args = ["--model", "tiny", "--prompts", str(prompts), "--steps", "4", "--gate", "2"]
        assert main([*args, "--threshold", "0.5", "--batch-size", str(bs), "--out", str(out)]) == 0
        runs[bs] = json.loads((out / JSON_NAME).read_text())
        assert runs[bs]["gate"] == 2 and runs[bs]["threshold"] == 0.5
    for name in runs[1]["layers"]:
        assert runs[1]["curves"][name] == pytest.approx(runs[2]["curves"][name], rel=1e-3, abs=1e-6)
    out = tmp_path / "one"
    assert main(["--model", "tiny", "--prompt", "a cat", "--steps", "3", "--out", str(out)]) == 0
    data = json.loads((out / JSON_NAME).read_text())
    assert data["prompts"] == ["a cat"] and len(data["mean"]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "{empty}"], "has no prompts"),
        (["--prompts", "{missing}"], "does not exist"),
        (["--prompt", "x", "--steps", "1"], "--steps must be an integer in 2.."),
        (["--prompt", "x", "--threshold", "0"], "--threshold must be a positive number"),
        (["--prompt", "x", "--threshold", "-0.1"], "--threshold must be a positive number"),
        (["--prompt", "x", "--threshold", "nan"], "--threshold must be a positive number"),
        (["--prompt", "x", "--steps", "5", "--gate", "0"], "--gate must be an integer in 1..5"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--model", "nope", "--prompt", "x"], "unknown model"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    paths = {"{empty}": str(empty), "{missing}": str(tmp_path / "missing.txt")}
    args = [paths.get(a, a) for a in extra]
    if "--model" not in args:
        args = ["--model", "tiny", *args]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--model", "tiny", "--out", str(tmp_path)], ["--prompt", "x", "--prompts", "f"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
    proc = subprocess.run(
        [sys.executable, "-m", "tgate_trt.tools.analyze", "--model", "tiny", "--prompt", "x", "--steps", "1"]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "tgate-analyze: error: --steps must be an integer in 2.." in proc.stderr


def _diffusers_curves(name: str, kind: str, prompts: list[str], steps: int) -> dict[str, list[float]]:
    """The same curves from diffusers' own pipeline loop, read with forward hooks: an independent oracle."""
    import torch
    from authors import tiny_pipe
    from diffusers.models.attention_processor import Attention

    pipe = tiny_pipe(name)
    names = [n for n, m in pipe.unet.named_modules() if isinstance(m, Attention) and n.endswith(f".{kind}")]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(pipe.unet.named_modules())
    for n in names:
        modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(sum(out.float().chunk(2)) / 2))
    gens = [torch.Generator().manual_seed(j) for j in range(len(prompts))]
    with torch.no_grad():
        pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, output_type="latent")
    curves = {}
    for n, outs in seen.items():
        flat = [o.flatten(1) for o in outs]
        curves[n] = [float(((a - b).norm(dim=1) / b.norm(dim=1)).mean()) for b, a in zip(flat, flat[1:], strict=False)]
    return curves


@pytest.mark.parametrize("kind", ["attn2", "attn1"])
def test_curves_equal_diffusers_own_loop(tmp_path: Path, kind: str) -> None:
    """The analysis runs on the one sampler loop; diffusers' pipeline with hooks on the same modules agrees."""
    prompts = ["a red circle on the left", "a blue square"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    args = ["--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--steps", "5", "--kind", kind]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert data["kind"] == kind and all(n.endswith(f".{kind}") for n in data["layers"])
    want = _diffusers_curves("tiny", kind, prompts, 5)
    assert sorted(want) == sorted(data["layers"])
    for name, curve in want.items():
        assert data["curves"][name] == pytest.approx(curve, rel=1e-4, abs=1e-7), name


def test_sdxl_family_runs_through_the_sampler(tmp_path: Path) -> None:
    """SDXL's added conditioning comes from the reference's encoder: the analysis is not SD-only."""
    assert main(["--model", "tiny-sdxl", "--prompt", "a cat", "--steps", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert len(data["layers"]) == 11 and len(data["mean"]) == 2 and all(math.isfinite(v) for v in data["mean"])
