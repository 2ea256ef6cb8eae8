"""tgate-eval's T-GATE V2 rows on the trained ``shapes`` model: real V1 and V2 exports, judged side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tgate_trt.tools.evaluate import main

V2_RUN = ["--steps", "8", "--gates", "5", "--v2", "5/2/2/1", "--seeds-per-prompt", "1"]


def test_v2_rows_beside_v1(shapes_export: Path, v2_export, tmp_path: Path) -> None:
    """8 steps, gate 5, 2 / 2 / 1: attn1 replayed before and after the gate (all five V2 graphs), on the V2
    export; the V1 rows on the V1 export, the same 75 prompts and seeds."""
    out = tmp_path / "eval"
    v2 = v2_export("shapes")
    assert main(["--export", str(shapes_export), "--v2-export", str(v2), *V2_RUN, "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["no gate", "gate 5", "V2 5/2/2/1"]
    base, gated, v2_row = report["rows"]
    assert (v2_row["schedule"], v2_row["gate"], v2_row["sp_interval"], v2_row["fi_interval"], v2_row["warm_up"]) == (
        "v2",
        5,
        2,
        2,
        1,
    )
    assert (gated["schedule"], gated["sp_interval"], gated["fi_interval"], gated["warm_up"]) == ("v1", 1, 1, 0)
    assert base["mad_vs_baseline"] == 0.0 and gated["mad_vs_baseline"] > 0.0
    assert v2_row["mad_vs_baseline"] > 0.0 and v2_row["mad_vs_baseline"] != gated["mad_vs_baseline"]
    assert all(0.0 <= r[k] <= 1.0 for r in report["rows"] for k in ("color", "shape", "position", "all"))
    assert report["v2_export"] == str(v2) and report["export"] == str(shapes_export)
    md = (out / "eval.md").read_text()
    assert "| V2 5/2/2/1 |" in md and "V2 G/SP/FI/WU" in md
    assert (out / "grid.png").stat().st_size > 10_000


def test_a_v2_export_runs_every_row(v2_export, tmp_path: Path) -> None:
    """--export a V2 export: the V1 rows run on its graphs as V1 (no self-attention replayed), the V2 rows too."""
    v2 = v2_export("shapes")
    argv = ["--export", str(v2), "--steps", "4", "--gates", "2", "--v2", "3/2/1/1", "--seeds-per-prompt", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["no gate", "gate 2", "V2 3/2/1/1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--v2", "10/5"], "--v2 takes GATE/SP/FI/WARMUP"),
        (["--v2", "10/5/1/x"], "--v2 takes GATE/SP/FI/WARMUP"),
        (["--v2", "30/5/1/2"], "--v2 gate must be an integer in 1..25"),
        (["--v2", "10/0/1/2"], "--v2 sp_interval must be an integer in 1..1000"),
        (["--v2", "10/5/1/2,10/5/1/2"], "--v2 names a setting twice"),
        (["--v2", "10/1/1/0"], "put it in --gates"),
        (["--v2", "10/5/1/2"], "--v2 rows need a --schedule v2 export"),  # --export is V1
        (["--v2-export", "{shapes}"], "--v2-export is the export of the --v2 rows"),
        (["--v2", "10/5/1/2", "--v2-export", "{shapes}"], "--v2 rows need a --schedule v2 export"),
    ],
)
def test_v2_refusals(shapes_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra, message) -> None:
    argv = [a.replace("{shapes}", str(shapes_export)) for a in extra]
    out = tmp_path / "out"
    assert main(["--export", str(shapes_export), *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
