"""Issue #14 for the tool CLIs: every bad input is one clear line and exit 2, refused before any model or
graph is loaded, and leaves nothing behind (no output, no temp file, no lock, nothing of the user's touched).

Each case runs the CLI as a user does (``python -m ...`` in a fresh process) from a scratch folder; the
scratch folder, the exports and the shipped shapes weights are listed before and after, and must not change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgate_trt.zoo.shapes import WEIGHTS

MODULES = {
    "tgate-macs": "tgate_trt.tools.macs",
    "tgate-analyze": "tgate_trt.tools.analyze",
    "tgate-eval": "tgate_trt.tools.evaluate",
    "tgate-bench": "tgate_trt.tools.bench",
    "train_shapes": "tgate_trt.zoo.shapes.train",
}
FAST = 5.0  # seconds per refusal, interpreter start and imports included: nothing heavy is loaded first
TIMES: dict[str, float] = {}

AN = ["--model", "tiny", "--prompt", "a red circle"]
EV = ["--export", "{shapes}"]
BE = ["--model", "tiny", "--export", "{tiny}", "--height", "64", "--width", "64", "--steps", "4", "--gate", "2"]

CASES = [
    # --- tgate-macs ---------------------------------------------------------------------------------
    ("tgate-macs", ["{tiny}", "--batch", "0"], "--batch must be an integer in 1..64, got 0"),
    ("tgate-macs", ["{tiny}", "--batch", "65"], "--batch must be an integer in 1..64"),
    ("tgate-macs", ["{tiny}", "--steps", "0"], "--steps must be an integer in 1..1000"),
    ("tgate-macs", ["{tiny}", "--gate", "0"], "--gate must be an integer >= 1"),
    ("tgate-macs", ["{tiny}", "--height", "70"], "multiples of 16"),
    ("tgate-macs", ["{tiny}", "--width", "-64"], "--width must be an integer >= 1"),
    ("tgate-macs", ["{tiny}", "--height", "1024", "--width", "1024"], "over this export's cap"),
    ("tgate-macs", ["{missing}"], "does not exist"),
    ("tgate-macs", ["{tiny}", "--json", "{tmp}/m.txt"], "--json must be a .json path"),
    ("tgate-macs", ["{tiny}", "--json", "{out}/m.json"], "does not exist: create it first"),
    ("tgate-macs", ["{tiny}", "--json", "{tmp}/dir.json"], "is a folder"),
    ("tgate-macs", ["{tiny}", "--steps", "ten"], "invalid int value"),
    ("tgate-macs", ["{tiny}", "--schedule", "v2"], "re-export with --schedule v2"),
    ("tgate-macs", ["{tiny}", "--sp-interval", "0"], "--sp-interval must be an integer in 1..1000"),
    ("tgate-macs", ["{tiny}", "--schedule", "v1", "--warm-up", "2"], "--warm-up is a V2 parameter"),
    ("tgate-macs", [], "name an export folder or --model"),
    # --- tgate-analyze ------------------------------------------------------------------------------
    ("tgate-analyze", [*AN, "--height", "63", "--out", "{out}"], "must be multiples of 16"),
    ("tgate-analyze", [*AN, "--height", "99999", "--out", "{out}"], "--height must be an integer in 1..16384"),
    ("tgate-analyze", [*AN, "--out", "{tmp}/file.txt"], "exists and is not a folder"),
    ("tgate-analyze", [*AN, "--steps", "1", "--out", "{out}"], "--steps must be an integer in 2.."),
    ("tgate-analyze", [*AN, "--threshold", "nan", "--out", "{out}"], "--threshold must be a positive number"),
    ("tgate-analyze", [*AN, "--batch-size", "0", "--out", "{out}"], "--batch-size must be an integer in 1..64"),
    ("tgate-analyze", [*AN, "--steps", "8", "--gate", "9", "--out", "{out}"], "--gate must be an integer in 1..8"),
    ("tgate-analyze", [*AN, "--guidance-scale", "inf", "--out", "{out}"], "--guidance-scale must be a finite"),
    ("tgate-analyze", [*AN, "--seed", "-1", "--out", "{out}"], "--seed must be an integer in 0.."),
    ("tgate-analyze", ["--model", "tiny", "--prompts", "{missing}", "--out", "{out}"], "does not exist"),
    ("tgate-analyze", ["--model", "tiny", "--prompts", "{tmp}/blank.txt", "--out", "{out}"], "has no prompts"),
    ("tgate-analyze", [*AN, "--out", "{tmp}/analyze"], "already holds convergence.json, convergence.png"),
    ("tgate-analyze", [*AN, "--out", "{tmp}/png-only", "--force"], "no convergence.json of tgate-analyze"),
    ("tgate-analyze", ["--model", "{tiny}", "--prompt", "x", "--out", "{tiny}/a"], "which this command reads"),
    ("tgate-analyze", ["--model", "sd99", "--prompt", "x", "--out", "{out}"], "unknown model 'sd99'"),
    # --- tgate-eval ---------------------------------------------------------------------------------
    ("tgate-eval", [*EV, "--batch", "0", "--out", "{out}"], "--batch must be an integer in 1..64, got 0"),
    ("tgate-eval", [*EV, "--seeds-per-prompt", "0", "--out", "{out}"], "--seeds-per-prompt must be an integer"),
    ("tgate-eval", [*EV, "--gates", "0", "--out", "{out}"], "--gates must be an integer in 1..24"),
    ("tgate-eval", [*EV, "--gates", "3,3", "--out", "{out}"], "--gates names a gate twice"),
    ("tgate-eval", [*EV, "--gates", "3,x", "--out", "{out}"], "--gates takes comma-separated integers"),
    ("tgate-eval", [*EV, "--steps", "6", "--gates", "6", "--out", "{out}"], "is the no-gate run"),
    ("tgate-eval", [*EV, "--steps", "0", "--out", "{out}"], "--steps must be an integer in 1..1000"),
    ("tgate-eval", [*EV, "--guidance", "nan", "--out", "{out}"], "--guidance must be a finite number"),
    ("tgate-eval", [*EV, "--threads", "-1", "--out", "{out}"], "--threads must be an integer in 0..1024"),
    ("tgate-eval", [*EV, "--engines", "openvino", "--out", "{out}"], "use it with --backend openvino"),
    ("tgate-eval", ["--export", "{tmp}/foreign", "--out", "{out}"], "is not an export folder"),
    ("tgate-eval", [*EV, "--out", "{tmp}/file.txt"], "exists and is not a folder"),
    ("tgate-eval", [*EV, "--out", "{tmp}/eval"], "already holds eval.json"),
    ("tgate-eval", [*EV, "--out", "{shapes}/quality"], "which this command reads"),
    ("tgate-eval", [*EV, "--v2", "5/x", "--out", "{out}"], "--v2 takes GATE/SP/FI/WARMUP"),
    ("tgate-eval", [*EV, "--v2", "10/5/1/2", "--out", "{out}"], "--v2 rows need a --schedule v2 export"),
    ("tgate-eval", [*EV, "--v2-export", "{shapes}", "--out", "{out}"], "--v2-export is the export of the --v2 rows"),
    # --- tgate-bench --------------------------------------------------------------------------------
    ("tgate-bench", [*BE, "--runs", "0", "--out", "{out}"], "--runs must be an integer in 1..1000"),
    ("tgate-bench", [*BE, "--gate", "0", "--out", "{out}"], "--gate must be an integer >= 1"),
    ("tgate-bench", [*BE, "--steps", "1001", "--out", "{out}"], "--steps must be an integer in 1..1000"),
    ("tgate-bench", [*BE, "--height", "70", "--out", "{out}"], "multiples of 16"),
    ("tgate-bench", [*BE, "--variants", "c,nope", "--out", "{out}"], "unknown variant 'nope'"),
    ("tgate-bench", [*BE, "--variants", "q", "--out", "{out}"], "needs --int8-export"),
    ("tgate-bench", [*BE, "--variants", "q", "--int8-export", "{tiny}", "--out", "{out}"], "not a tgate-quantize"),
    ("tgate-bench", [*BE, "--mac-ratio", "0", "--out", "{out}"], "--mac-ratio must be > 0"),
    ("tgate-bench", [*BE, "--prompt", " ", "--out", "{out}"], "--prompt is empty"),
    ("tgate-bench", [*BE, "--out", "{tiny}/bench"], "which this command reads"),
    ("tgate-bench", [*BE, "--out", "{tmp}/bench"], "already holds bench.json"),
    ("tgate-bench", [*BE, "--optimum-unet", "{tmp}/foreign", "--out", "{out}"], "holds no source.json"),
    ("tgate-bench", ["--export", "{missing}", "--out", "{out}"], "does not exist"),
    ("tgate-bench", [*BE, "--variants", "c,d-v2", "--out", "{out}"], "needs a --schedule v2 export"),
    ("tgate-bench", [*BE, "--variants", "d-v2", "--v2-export", "{tiny}", "--out", "{out}"], "is a v1 export"),
    ("tgate-bench", [*BE, "--sp-interval", "0", "--out", "{out}"], "--sp-interval must be an integer in 1..1000"),
    # --- shapes training ----------------------------------------------------------------------------
    ("train_shapes", ["--out", "{weights}"], "shipped shapes weights: pass --overwrite-shipped"),
    ("train_shapes", [], "pass --out DIR for a newly trained model, or --overwrite-shipped"),
    ("train_shapes", ["--out", "{weights}/unet"], "lies inside the package's shipped weights"),
    ("train_shapes", ["--out", "{out}", "--work", "{out}/ckpt"], "which this command reads"),
    ("train_shapes", ["--out", "{tmp}/foreign", "--force"], "is not an output of tgate-trt"),
    ("train_shapes", ["--out", "{tmp}/trained"], "is not empty: pass --force"),
    ("train_shapes", ["--out", "{out}", "--seed", "-1"], "--seed must be an integer in 0..4294967295"),
    ("train_shapes", ["--out", "{out}", "--threads", "0"], "--threads must be an integer in 1.."),
]


def _layout(tmp: Path) -> None:
    """What a user's folder holds: a file, someone else's folder, earlier reports, a training output."""
    (tmp / "file.txt").write_text("not a folder\n")
    (tmp / "blank.txt").write_text("\n   \n")
    (tmp / "dir.json").mkdir()
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("the user's\n")
    (tmp / "png-only").mkdir()
    (tmp / "png-only" / "convergence.png").write_bytes(b"someone else's plot")
    reports = {
        "analyze": {"convergence.json": {"curves": {}, "mean": []}, "convergence.png": None},
        "eval": {"eval.json": {"rows": []}, "eval.md": None, "grid.png": None},
        "bench": {"bench.json": {"meta": {}, "results": []}, "bench.md": None, "bench.png": None},
    }
    for folder, files in reports.items():
        (tmp / folder).mkdir()
        (tmp / folder / "earlier-sitting").mkdir()  # a report folder may hold other things
        for name, data in files.items():
            (tmp / folder / name).write_text(json.dumps(data) if data is not None else "earlier\n")
    (tmp / "trained").mkdir()
    (tmp / "trained" / "weights.json").write_text(json.dumps({"files": {}}))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (hidden ones included) with its size and mtime."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            out[str(path.relative_to(folder))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.mark.parametrize(
    ("prog", "args", "message"),
    [pytest.param(*case, id=f"{case[0]}-{i:02d}") for i, case in enumerate(CASES)],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_export: Path, prog: str, args: list[str], message: str
) -> None:
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    _layout(scratch)
    places = {"tmp": scratch, "out": scratch / "out", "missing": scratch / "missing", "weights": WEIGHTS}
    places["tiny"] = tiny_export
    if any("{shapes}" in a for a in args):
        places["shapes"] = request.getfixturevalue("shapes_export")
    argv = [a.format(**places) for a in args]
    watched = [scratch, tiny_export, WEIGHTS, *([places["shapes"]] if "shapes" in places else [])]
    before = [_listing(f) for f in watched]

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", MODULES[prog], *argv], capture_output=True, text=True, cwd=scratch, timeout=120
    )
    seconds = time.perf_counter() - start
    TIMES[request.node.callspec.id] = seconds

    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert not (scratch / "out").exists()
    assert [_listing(f) for f in watched] == before  # nothing written, replaced, locked or left half-done
    assert seconds < FAST, f"{prog} took {seconds:.1f}s to refuse: the check must come before loading"


def teardown_module() -> None:
    if TIMES:
        slowest = max(TIMES, key=TIMES.__getitem__)
        print(f"\n{len(TIMES)} refusals; slowest {slowest}: {TIMES[slowest]:.2f}s", file=sys.stderr)


def test_the_matrix_covers_every_tool() -> None:
    assert len(CASES) >= 30
    assert {prog for prog, _, _ in CASES} == set(MODULES)


def test_debug_shows_the_traceback(tiny_export: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", MODULES["tgate-macs"], str(tiny_export), "--batch", "0", "--debug"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tgate-macs: error: --batch")
