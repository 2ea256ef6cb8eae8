"""Issue #15: the options several tools share come from one argument group each (``contract/args.py``).

The real ``tgate`` subcommands, no mocks: the same bad value gets the same one-line message and exit 2
through every subcommand that has the option, every subcommand's ``--help`` shows the groups it uses, and
every shared option in every parser was added by its group (so it is defined and checked in one place).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tgate_trt.cli.main import COMMANDS
from tgate_trt.cli.main import main as tgate
from tgate_trt.contract.args import (
    ABSENT,
    GROUPS,
    BackendArgs,
    OutputArgs,
    SamplingArgs,
    ScheduleArgs,
    SizeArgs,
    parse,
)
from tgate_trt.contract.errors import UsageError

# subcommand -> the module whose build_parser() is its parser
PARSERS = {
    "export": "tgate_trt.export.cli",
    "build": "tgate_trt.engines.cli",
    "run": "tgate_trt.runtime.cli",
    "serve": "tgate_trt.triton.cli",
    "quantize": "tgate_trt.export.quantize",
    "bench": "tgate_trt.tools.bench",
    "eval": "tgate_trt.tools.evaluate",
    "macs": "tgate_trt.tools.macs",
    "analyze": "tgate_trt.tools.analyze",
}
# the groups each subcommand shows under their own title (build puts its shared options in its own groups)
TITLES = {
    "export": ("image size", "output"),
    "build": ("output",),
    "run": ("sampling", "image size", "T-GATE V2 schedule", "runtime backend", "output"),
    "serve": ("sampling", "image size", "runtime backend", "output"),
    "quantize": ("output",),
    "bench": ("sampling", "image size", "T-GATE V2 schedule", "runtime backend", "output"),
    "eval": ("sampling", "runtime backend", "output"),
    "macs": ("sampling", "T-GATE V2 schedule", "image size"),
    "analyze": ("sampling", "image size", "output"),
}
# what each subcommand needs besides the bad value ({export}: the tiny export, {tmp}: the test's folder)
BASE = {
    "export": ["--model", "tiny", "--out", "{tmp}/export"],
    "build": ["{export}"],
    "run": ["{export}", "a red circle", "--out", "{tmp}/image.png"],
    "serve": ["{export}", "--repo", "{tmp}/repo"],
    "bench": ["--model", "tiny", "--export", "{export}", "--out", "{tmp}/bench"],
    "eval": ["--export", "{export}", "--out", "{tmp}/eval"],
    "macs": ["{export}"],
    "analyze": ["--model", "tiny", "--prompt", "a red circle", "--out", "{tmp}/analyze"],
}
STEPS_WHY = "a step before the gate; use --gate >= --steps for no gating"
# bad value -> (the subcommands that take it, the one message all of them give)
SAME: dict[str, tuple[tuple[str, ...], str]] = {
    "--steps 0": (("run", "bench", "macs", "eval", "serve"), "--steps must be an integer in 1..1000, got 0"),
    "--steps 1001": (("run", "bench", "macs", "eval", "serve"), "--steps must be an integer in 1..1000, got 1001"),
    "--gate 0": (
        ("run", "bench", "macs", "serve"),
        f"--gate must be an integer >= 1, got 0: the cache comes from {STEPS_WHY}",
    ),
    "--guidance nan": (("run", "eval", "serve"), "--guidance must be a finite number in 0..100, got nan"),
    "--seed -1": (
        ("run", "bench", "analyze"),
        "--seed must be an integer in 0..9223372036854775807, got -1 (seeds are 0..2**63-1)",
    ),
    "--height 63 --width 64": (
        ("run", "bench", "macs", "build"),
        "height and width must be positive multiples of 16 for this export, got 63x64",
    ),
    "--width 0": (("run", "bench", "macs", "build", "export"), "--width must be an integer >= 1, got 0"),
    "--max-pixels 0": (("run", "bench", "macs", "serve"), "--max-pixels must be an integer >= 1, got 0"),
    "--sp-interval 0": (
        ("run", "bench", "macs"),
        "--sp-interval must be an integer in 1..1000, got 0 (1 recomputes self-attention every step)",
    ),
    "--fi-interval 1001": (
        ("run", "bench", "macs"),
        "--fi-interval must be an integer in 1..1000, got 1001 (1 recomputes self-attention every step)",
    ),
    "--warm-up -1": (("run", "bench", "macs"), "--warm-up must be an integer in 0..1000, got -1"),
    "--threads -1": (
        ("run", "bench", "eval", "serve", "build"),
        "--threads must be an integer in 0..1024, got -1 (0: the backend's choice)",
    ),
    "--engines mine": (("run", "eval", "serve"), "--engines names an OpenVINO build: use it with --backend openvino"),
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    """``tgate argv`` in this process: exit 2 and one line; returns (prog, message)."""
    try:
        code = tgate(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, err)
    prog, sep, message = lines[0].partition(": error: ")
    assert sep and prog.startswith("tgate-"), lines[0]
    return prog, message


@pytest.mark.parametrize("bad", list(SAME))
def test_the_same_bad_value_gets_the_same_message_from_every_subcommand(
    bad: str, tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    commands, expected = SAME[bad]
    before, export_before = _listing(tmp_path), _listing(tiny_export)
    messages = {}
    for name in commands:
        argv = [a.replace("{export}", str(tiny_export)).replace("{tmp}", str(tmp_path)) for a in BASE[name]]
        _, messages[name] = _refusal(capsys, [name, *argv, *bad.split()])
    assert set(messages.values()) == {expected}, messages
    assert _listing(tmp_path) == before and _listing(tiny_export) == export_before  # refused before any work


def test_a_bound_of_one_tool_reads_like_the_shared_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """analyze's own bounds (a change needs two steps; a gate mark inside the run) in the groups' words."""
    base = ["analyze", *[a.replace("{tmp}", str(tmp_path)) for a in BASE["analyze"]]]
    got = _refusal(capsys, [*base, "--steps", "1"])[1]
    assert got == "--steps must be an integer in 2..1000, got 1 (a change needs two steps)"
    assert _refusal(capsys, [*base, "--steps", "5", "--gate", "6"])[1] == "--gate must be an integer in 1..5, got 6"
    assert _refusal(capsys, [*base, "--guidance-scale", "inf"])[1].startswith("--guidance-scale must be a finite")
    assert list(tmp_path.iterdir()) == []


def test_a_real_process_refuses_the_same_way(tiny_export: Path, tmp_path: Path) -> None:
    """``tgate run`` and ``tgate-macs`` (the alias's module) as a user starts them."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "tgate_trt.cli.main", "run", str(tiny_export), "x", "--out", str(tmp_path / "a.png")]
    macs = [sys.executable, "-m", "tgate_trt.tools.macs", str(tiny_export)]
    for cmd, prog in ((run, "tgate-run"), (macs, "tgate-macs")):
        proc = subprocess.run([*cmd, "--steps", "0"], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"{prog}: error: --steps must be an integer in 1..1000, got 0\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_the_shared_group_titles(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tgate([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for title in TITLES[name]:
        assert re.search(rf"^{re.escape(title)}( \(.+\))?:$", text, re.M), (name, title, text)


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(PARSERS[name]).build_parser()


OWNER = {flag: group for group in GROUPS for flag in group.flags}
OWNER["--guidance-scale"] = SamplingArgs  # analyze's name for the guidance flag
OTHER_MEANING = {("export", "--engines")}  # export's --engines: "then build TensorRT engines", a switch of its own


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_shared_option_comes_from_its_group(name: str) -> None:
    parser = _parser(name)
    seen = set()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag in OWNER and (name, flag) not in OTHER_MEANING:
                assert getattr(action, "arg_group", None) == OWNER[flag].__name__, (name, flag)
                assert action.dest == flag.lstrip("-").replace("-", "_"), (name, flag, action.dest)
                seen.add(flag)
    assert seen, name  # every subcommand has some shared option
    assert set(PARSERS) == set(COMMANDS)


def test_the_subcommands_share_what_the_issue_lists() -> None:
    """Where each option is: the groups' flags across the subcommands, each defined by its group."""
    flags = {name: {f for a in _parser(name)._actions for f in a.option_strings} for name in PARSERS}
    for flag, users in {
        "--steps": ("run", "serve", "bench", "eval", "macs", "analyze"),
        "--seed": ("run", "bench", "analyze"),
        "--height": ("export", "build", "run", "bench", "macs", "analyze"),
        "--max-pixels": ("run", "serve", "bench", "macs", "analyze"),
        "--sp-interval": ("run", "bench", "macs"),
        "--backend": ("run", "serve", "eval"),
        "--threads": ("build", "run", "serve", "bench", "eval"),
        "--force": ("export", "serve", "quantize", "bench", "eval", "analyze"),
    }.items():
        assert {name for name, have in flags.items() if flag in have} == set(users), flag


def test_tool_defaults_and_unset_values() -> None:
    """Per-tool defaults; a None default is "the export's" (not checked), a missing option is not added."""
    run, bench = _parser("run"), _parser("bench")
    assert run.get_default("steps") is None and bench.get_default("steps") == 25
    assert [bench.get_default(d) for d in ("sp_interval", "fi_interval", "warm_up")] == [5, 1, 2]  # the authors'
    assert run.get_default("out") == Path("out/image.png") and bench.get_default("out") == Path("out/bench")
    group = SamplingArgs(steps=None, gate=10)
    parser = argparse.ArgumentParser()
    group.add_to(parser)
    assert "--seed" not in parser._option_string_actions and "--guidance" not in parser._option_string_actions
    assert group.parse(parser.parse_args([])).steps is None  # unset: the tool fills it in
    with pytest.raises(UsageError, match="--gate must be an integer, got None"):
        group.parse(argparse.Namespace(steps=None, gate=None))  # the API's None where an int is due
    with pytest.raises(UsageError, match="--steps must be an integer in 1..1000, got 0"):
        parse(parser.parse_args(["--steps", "0"]), group)


def test_groups_go_into_a_tools_own_group() -> None:
    """build keeps --threads under "OpenVINO" and --height/--width under "TensorRT"."""
    text = _parser("build").format_help()
    openvino = text[text.index("OpenVINO (--target openvino):") : text.index("TensorRT (--target tensorrt):")]
    assert "--threads" in openvino and "--height" in text[text.index("TensorRT") :]
    assert "runtime backend" not in text and "image size" not in text


def test_each_group_alone() -> None:
    ns = argparse.Namespace
    SizeArgs(max_side=100).parse(ns(height=100, width=None, max_pixels=None))
    with pytest.raises(UsageError, match="--width must be an integer in 1..100, got 101"):
        SizeArgs(max_side=100).parse(ns(height=None, width=101, max_pixels=None))
    ScheduleArgs().parse(ns(sp_interval=None, fi_interval=None, warm_up=None))
    with pytest.raises(UsageError, match="--warm-up must be an integer in 0..1000"):
        ScheduleArgs().parse(ns(sp_interval=5, fi_interval=1, warm_up=-1))
    backend = BackendArgs(backends=("ort", "openvino"), engines=None)
    backend.parse(ns(backend="openvino", engines="mine", threads=0))
    with pytest.raises(UsageError, match="use it with --backend openvino"):
        backend.parse(ns(backend="ort", engines="mine", threads=0))
    BackendArgs(threads=ABSENT).parse(ns())  # nothing of its own: nothing to check
    parser = argparse.ArgumentParser()
    OutputArgs.report(Path("out/x"), ("x.json", "x.md")).add_to(parser)
    assert parser.parse_args(["--force"]).force and parser.get_default("out") == Path("out/x")


def test_tgate_help_lists_the_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert tgate(["--help"]) == 0
    text = capsys.readouterr().out
    for group in GROUPS:
        assert re.search(rf"^  {re.escape(group.title)} +{' '.join(group.flags)}$", text, re.M), group.title
