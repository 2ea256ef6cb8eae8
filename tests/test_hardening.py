"""Issue #14: every command refuses bad input the same way, early, in one line, and leaves nothing behind.

The matrix (``tests/hardening_cases.py``) runs each CLI row in a subprocess on a damaged copy of the
tiny export and checks: exit code 2, the message, one line on stderr and no traceback, the refusal
before hashing or loading (guards make hashing or loading abort the run), and the test folder
byte-for-byte as it was (no temp, old or lock files, no partial output, sources unchanged). API rows
check the same through ``TGatePipeline``. The fault tests kill, hang up and race real exports.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hardening_cases import API_CASES, CLI_CASES, Case, Ctx

LIMIT_S = {"export": 15.0}  # tgate-export imports torch and diffusers before it can refuse
DEFAULT_LIMIT_S = 8.0
LEFTOVERS = (".*.tmp-*", ".*.old-*", ".*.lock")
PROGS = {
    "export": "tgate-export",
    "run": "tgate-run",
    "quantize": "tgate-quantize",
    "build": "tgate-build",
    "build-trt": "tgate-build",
}

# Runs one CLI with guards: with ``hash``, hashing a file aborts (exit 99); with ``hash`` or ``load``,
# loading a model or graph does. So a row passes only if it is refused before that stage.
RUNNER = r"""
import os, sys

def boom(what):
    def refuse(*args, **kwargs):
        sys.stderr.write(f"HARDENING-GUARD: {what} before the refusal\n")
        sys.stderr.flush()
        os._exit(99)
    return refuse

tool, before, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if before == "hash":
    import tgate_trt.manifest as mf
    mf.sha256_file = boom("hashed a file")
if before in ("hash", "load"):
    if tool == "export":
        import tgate_trt.families.load as models
        for name in ("build_tiny", "build_from_architecture", "_load_pretrained", "_load_single_file"):
            setattr(models, name, boom("loaded the model"))
    elif tool == "run":
        import onnxruntime
        import tgate_trt.runtime.pipeline as pipeline
        onnxruntime.InferenceSession = pipeline.OrtEngine = boom("loaded a graph")
    elif tool == "quantize":
        import tgate_trt.export.quantize as quantize
        quantize._quantize_graph = quantize.relative_errors = boom("read a graph")
    elif tool == "build":
        import tgate_trt.engines.openvino as openvino
        openvino._convert = openvino.validation_feeds = boom("converted a graph")
    elif tool == "build-trt":
        import tgate_trt.engines.build as build
        build.prepare_onnx = boom("read a graph")
if tool == "export":
    from tgate_trt.engines.cli import export_main as main
elif tool == "run":
    from tgate_trt.runtime.cli import main
elif tool == "quantize":
    from tgate_trt.export.quantize import main
else:
    from tgate_trt.engines.cli import main
sys.exit(main(argv))
"""


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every path under ``root``: folders, symlinks (their target) and files (their sha256)."""
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", oct(path.stat().st_mode & 0o777))
            else:
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def assert_unchanged(before: dict[str, tuple[str, ...]], after: dict[str, tuple[str, ...]]) -> None:
    added = sorted(set(after) - set(before))
    left = [p for p in added if any(fnmatch.fnmatch(Path(p).name, pat) for pat in LEFTOVERS)]
    assert not left, f"left behind: {left}"
    assert not added, f"written although refused: {added}"
    removed = sorted(set(before) - set(after))
    assert not removed, f"removed although refused: {removed}"
    changed = sorted(p for p in before if before[p] != after[p])
    assert not changed, f"changed although refused: {changed}"


def leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for pattern in LEFTOVERS:
            found += [str(p) for p in folder.glob(pattern)]
    return found


@pytest.fixture
def ctx(tmp_path: Path, tiny_export: Path):
    """A fresh copy of the tiny export at ``tmp/exports/tiny`` (rows damage the copy, never the fixture)."""
    export = tmp_path / "exports" / "tiny"
    shutil.copytree(tiny_export, export)
    context = Ctx(tmp_path, export)
    yield context
    for cleanup in reversed(context.cleanups):
        cleanup()


def run_cli(tool: str, argv: list[str | bytes], cwd: Path, before: str | None = None, timeout: float = 120):
    cmd: list[str | bytes] = [sys.executable, "-c", RUNNER, tool, before or "-", *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), elapsed


def check_refusal(case: Case, code: int, stderr: str, elapsed: float, message: str) -> None:
    assert "HARDENING-GUARD" not in stderr, f"refused too late: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert code == case.code, f"exit {code}: {stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line: {stderr}"
    assert lines[0].startswith(f"{PROGS[case.tool]}: error: "), lines[0]
    assert message in lines[0], lines[0]
    limit = LIMIT_S.get(case.tool, DEFAULT_LIMIT_S)
    assert elapsed < limit, f"refused after {elapsed:.1f} s (> {limit} s)"


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_refuses(case: Case, ctx: Ctx, request: pytest.FixtureRequest) -> None:
    case.prepare(ctx)
    before = snapshot(ctx.tmp)
    argv = [a if isinstance(a, bytes) else ctx.fmt(a) for a in case.args]
    code, _, stderr, elapsed = run_cli(case.tool, argv, ctx.tmp, case.before)
    request.node.user_properties.append(("refusal_s", round(elapsed, 2)))  # -o junit_family=xunit1 reports it
    check_refusal(case, code, stderr, elapsed, ctx.fmt(case.message))
    assert_unchanged(before, snapshot(ctx.tmp))


def test_matrix_size() -> None:
    tools = {case.tool for case in CLI_CASES + API_CASES}
    assert tools == {"export", "run", "quantize", "build", "build-trt", "api"}
    assert len(CLI_CASES) + len(API_CASES) >= 50
    ids = [c.id for c in CLI_CASES + API_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("tool", "argv"),
    [
        ("run", ["{export}", "a cat", "--seed", "-1"]),
        ("export", ["--model", "tiny", "--out", "{tmp}/out", "--dtype", "fp8"]),
        ("quantize", ["{export}", "--out", "{tmp}/out", "--tolerance", "nan"]),
    ],
)
def test_debug_shows_the_traceback(tool: str, argv: list[str], ctx: Ctx) -> None:
    code, _, stderr, _ = run_cli(tool, [ctx.fmt(a) for a in argv] + ["--debug"], ctx.tmp)
    assert code == 2
    assert "Traceback" in stderr and f"{PROGS[tool]}: error: " in stderr.strip().splitlines()[-1]


# --- the Python API --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_pipe(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory):
    from tgate_trt.runtime.pipeline import TGatePipeline

    copy = tmp_path_factory.mktemp("api") / "tiny"
    shutil.copytree(tiny_export, copy)
    return TGatePipeline.from_export(copy)


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_api_refuses(case: Case, ctx: Ctx, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    import tgate_trt.manifest as mf
    import tgate_trt.runtime.pipeline as pipeline

    def guard(what: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"{what} before the refusal")

        return refuse

    pipe = request.getfixturevalue("api_pipe") if case.needs_pipe else None
    case.prepare(ctx)
    before = snapshot(ctx.tmp)
    if case.before == "hash":
        monkeypatch.setattr(mf, "sha256_file", guard("hashed a file"))
    if case.before in ("hash", "load"):
        import tgate_trt.families.load as models

        monkeypatch.setattr(pipeline, "OrtEngine", guard("loaded a graph"))
        for name in ("build_tiny", "build_from_architecture", "_load_pretrained", "_load_single_file"):
            monkeypatch.setattr(models, name, guard("loaded a model"))
    calls = {k: e.calls for k, e in pipe.engines.items()} if pipe is not None else {}
    assert case.exc is not None and case.call is not None
    start = time.perf_counter()
    with pytest.raises(case.exc) as info:
        case.call(ctx, pipe)
    elapsed = time.perf_counter() - start
    assert case.message in str(info.value)
    assert "\n" not in str(info.value)
    assert elapsed < 2.0, f"refused after {elapsed:.2f} s"
    if pipe is not None:
        assert {k: e.calls for k, e in pipe.engines.items()} == calls, "a graph ran before the refusal"
    assert_unchanged(before, snapshot(ctx.tmp))


def test_long_prompt_is_reported(api_pipe) -> None:
    prompt = " ".join(["a red circle on the left"] * 30)
    tokens = api_pipe.conditioner.token_counts([prompt])[0]
    assert tokens > api_pipe.conditioner.window
    result = api_pipe([prompt, "a blue square"], num_inference_steps=2)
    assert result.truncated == {0: tokens}
    assert api_pipe("a blue square", num_inference_steps=2).truncated == {}


def test_long_prompt_is_warned(ctx: Ctx) -> None:
    prompt = " ".join(["a red circle on the left"] * 30)
    out = ctx.tmp / "long.png"
    code, stdout, stderr, _ = run_cli("run", [str(ctx.export), prompt, "--steps", "2", "--out", str(out)], ctx.tmp)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "the rest is ignored" in warnings[0], stderr
    assert out.is_file() and not leftovers(ctx.tmp)


def test_json_numbers_are_valid(tiny_export: Path, tmp_path: Path) -> None:
    from tgate_trt.contract.files import atomic_write_json

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    json.loads((tiny_export / "manifest.json").read_text(), parse_constant=no_constants)
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"tolerance": float("nan")})
    assert not list(tmp_path.iterdir())


# --- faults: killed, hung up, raced ----------------------------------------------------------------
EXPORT_MAIN = "import sys; from tgate_trt.engines.cli import export_main; sys.exit(export_main())"
EXPORT_CMD = [sys.executable, "-c", EXPORT_MAIN]


def start_export(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EXPORT_CMD, "--model", "tiny", "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_staging(out: Path, proc: subprocess.Popen[str], timeout: float = 120) -> Path:
    """The temp folder an export builds in, once it exists (the export holds the lock by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.tmp-*"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the export never started staging")


def test_sigkill_then_rerun_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_export(out)
    stale = wait_for_staging(out, proc)
    proc.kill()
    proc.communicate()
    assert stale.is_dir() and not out.exists()  # a killed run can't clean up after itself
    rerun = subprocess.run([*EXPORT_CMD, "--model", "tiny", "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {stale}, left by an interrupted run" in rerun.stderr
    assert (out / "manifest.json").is_file()
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_sighup_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_export(out)
    wait_for_staging(out, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    assert "Traceback" not in stderr
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_two_writers_one_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start_export(out)
    wait_for_staging(out, first)
    start = time.perf_counter()
    second = subprocess.run([*EXPORT_CMD, "--model", "tiny", "--out", str(out)], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another process" in lines[0] and f"pid {first.pid}" in lines[0], second.stderr
    assert elapsed < LIMIT_S["export"]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert (out / "manifest.json").is_file()
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_force_onto_a_source_keeps_it(tmp_path: Path, tiny_export: Path) -> None:
    """A real diffusers folder as --model, --out its parent with --force; and a quantize onto its source."""
    from tgate_trt.families import build_tiny

    models = tmp_path / "models"
    build_tiny().save_pretrained(models / "my-sd")
    (models / ".tgate-trt").write_text("{}")  # even a folder that looks like ours
    exports = tmp_path / "exports"
    shutil.copytree(tiny_export, exports / "tiny")
    (exports / ".tgate-trt").write_text("{}")
    before = snapshot(tmp_path)
    for tool, argv in (
        ("export", ["--model", str(models / "my-sd"), "--out", str(models), "--force"]),
        ("export", ["--model", str(models / "my-sd"), "--out", str(models / "my-sd"), "--force"]),
        ("quantize", [str(exports / "tiny"), "--out", str(exports), "--force"]),
        ("quantize", [str(exports / "tiny"), "--out", str(exports / "tiny"), "--force"]),
    ):
        code, _, stderr, _ = run_cli(tool, argv, tmp_path, "load")
        assert code == 2 and "which this command reads" in stderr, stderr
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("tool", ["export", "quantize"])
def test_force_onto_a_symlinked_out(tool: str, tmp_path: Path, tiny_export: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copytree(tiny_export, real / "target")  # a previous output of ours
    link = tmp_path / "link"
    link.symlink_to(real / "target")
    if tool == "export":
        proc = subprocess.run(
            [*EXPORT_CMD, "--model", "tiny", "--out", str(link), "--force"], capture_output=True, text=True
        )
    else:
        from_ = tmp_path / "src"
        shutil.copytree(tiny_export, from_)
        proc = subprocess.run(
            [sys.executable, "-m", "tgate_trt.export.quantize", str(from_), "--out", str(link), "--force"],
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and link.resolve() == (real / "target").resolve()
    manifest = json.loads((link / "manifest.json").read_text())
    assert ("quantization" in manifest["extra"]) == (tool == "quantize")
    assert not leftovers(tmp_path, real), leftovers(tmp_path, real)
    assert sorted(os.listdir(real)) == ["target"]


def test_run_writes_through_a_symlinked_png(ctx: Ctx) -> None:
    target = ctx.tmp / "images" / "real.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = ctx.tmp / "link.png"
    link.symlink_to(target)
    code, _, stderr, _ = run_cli("run", [str(ctx.export), "a cat", "--steps", "2", "--out", str(link)], ctx.tmp)
    assert code == 0, stderr
    assert link.is_symlink() and target.read_bytes()[:4] == b"\x89PNG"
    assert not leftovers(ctx.tmp, target.parent)


def test_two_openvino_builds_keep_both_sections(ctx: Ctx) -> None:
    """Two builds into different folders of one export at once: the manifest gets both sections."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgate_trt.engines.cli",
                str(ctx.export),
                "--target",
                "openvino",
                "--precision",
                "f32",
                "--out",
                str(ctx.export / name),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("openvino", "ov2")
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    engines = json.loads((ctx.export / "manifest.json").read_text())["extra"]["engines"]
    assert sorted(engines) == ["openvino", "ov2"]
    assert not leftovers(ctx.export, ctx.tmp), leftovers(ctx.export, ctx.tmp)


def test_tensorrt_build_locks_its_out_and_removes_stale_work(ctx: Ctx, monkeypatch, capsys) -> None:
    """TensorRT is not installed here: the builder is stubbed, the CLI's own part runs for real."""
    import tgate_trt.engines.cli as cli

    out = ctx.export / "engines"
    stale = out / ".tgate-build-abc123"
    stale.mkdir(parents=True)
    lock = ctx.export / ".engines.lock"
    seen: list[bool] = []

    def build(export_dir: Path, out_dir: Path, *args: Any) -> dict[str, Any]:
        seen.append(lock.is_file() and not stale.exists())
        return {"plans": {}, "gpu": {"name": "stub", "compute_capability": "9.0"}, "tensorrt": "stub"}

    monkeypatch.setattr("tgate_trt.contract.cli.handle_signals", lambda: None)  # keep pytest's own handlers
    monkeypatch.setattr(cli, "import_tensorrt", lambda: None)
    monkeypatch.setattr(cli, "build_engines", build)
    assert cli.main([str(ctx.export)]) == 0
    assert seen == [True]
    assert f"removed {stale}, left by an interrupted build" in capsys.readouterr().err
    assert not leftovers(ctx.export), leftovers(ctx.export)


def test_run_removes_temp_files_of_killed_runs(ctx: Ctx) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    stale = ctx.tmp / f".image.tmp-{dead.pid}-x1y2z3.png"
    live = ctx.tmp / f".image.tmp-{os.getpid()}-a1b2c3.png"  # a writer still running (this test)
    stale.write_bytes(b"half a png")
    live.write_bytes(b"being written")
    out = ctx.tmp / "image.png"
    code, _, stderr, _ = run_cli("run", [str(ctx.export), "a cat", "--steps", "2", "--out", str(out)], ctx.tmp)
    assert code == 0, stderr
    assert f"removed {stale}, left by an interrupted run" in stderr
    assert not stale.exists() and live.exists() and out.is_file()
