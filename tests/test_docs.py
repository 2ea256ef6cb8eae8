"""README's examples, run in order the way a newcomer would (issue #17).

Every ```bash block of README.md runs with ``bash -e`` in one scratch folder, in README order, with the
venv's console scripts first on PATH (the examples use relative ``out/...`` paths, so everything lands in
that folder); every ```python block runs there with the venv's Python. A block right after an HTML comment
``<!-- docs: TAG -->`` is skipped, for the reason the tag names:

- ``gpu``: needs an NVIDIA GPU or TensorRT;
- ``download``: needs model weights from a hub, or files of the reader's own;
- ``slow``: a full-size job (minutes, GBs of memory and disk);
- ``setup``: installs the environment or runs the test suite itself;
- ``server``: starts a server that runs until stopped, or talks to one.

Afterwards the repository's ``git status`` must be what it was before: no example writes into the project.
The static checks (tags, the two fresh-machine commands, output paths) cost nothing and also hold the
skipped blocks to ``out/`` paths.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TAGS = {"gpu", "download", "slow", "setup", "server"}
MARKER = re.compile(r"^<!--\s*docs:\s*([\w\s,-]+?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
# flags whose value is a file or folder the command writes
OUTPUT_FLAGS = {"--out", "--repo", "--save-latents", "--json", "--optimum-unet", "--optimum-intel-dir"}
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    lang: str  # "bash" or "python"
    line: int  # 1-based line of the opening fence
    code: str
    tags: frozenset[str]

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang}{', ' + ', '.join(sorted(self.tags)) if self.tags else ''})"


def readme_blocks(text: str) -> list[Block]:
    """The ```bash and ```python blocks in order, each with the tags of a ``<!-- docs: ... -->`` right before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        lang, start = opening.group(1), i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if lang in ("bash", "python"):
            prev = start - 1
            while prev >= 0 and not lines[prev].strip():
                prev -= 1
            marker = MARKER.match(lines[prev].strip()) if prev >= 0 else None
            tags = frozenset(t for t in re.split(r"[\s,]+", marker.group(1)) if t) if marker else frozenset()
            blocks.append(Block(lang, start + 1, "\n".join(lines[start + 1 : i]) + "\n", tags))
        i += 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """The shell words of each command of a bash block (comments dropped, continuations joined)."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def git_status() -> set[str] | None:
    """The paths ``git status`` lists (modified, staged, untracked), or None outside a git checkout.

    Paths, not status letters: someone staging their own edits while this test runs doesn't count; a file an
    example modifies or creates in the repository does.
    """
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    done = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
    )
    return {line[3:] for line in done.stdout.splitlines()} if done.returncode == 0 else None


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_blocks_and_only_known_tags():
    assert len(BLOCKS) >= 10, "README.md should hold the runnable examples"
    lines = README.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if not marker:
            continue
        tags = {t for t in re.split(r"[\s,]+", marker.group(1)) if t}
        assert tags and tags <= TAGS, (
            f"README.md:{n + 1}: unknown docs tag(s) {sorted(tags - TAGS)}; known: {sorted(TAGS)}"
        )
        following = next((x.strip() for x in lines[n + 1 :] if x.strip()), "")
        assert following in ("```bash", "```python"), f"README.md:{n + 1}: a docs marker must come right before a block"


def test_fresh_machine_section_keeps_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    heading = text.find("## Fresh machine")
    assert heading >= 0, "README.md lost its 'Fresh machine' section"
    first = next(b for b in BLOCKS if b.lang == "bash")
    assert text.count("\n", 0, heading) < first.line, "the fresh-machine commands must be README's first bash block"
    assert [c[:2] for c in commands(first.code)] == [["bash", "scripts/demo.sh"], ["bash", "scripts/test.sh"]]
    assert "setup" in first.tags  # it installs the venv and runs this very suite: not run from here


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=str)
def test_examples_write_under_out(block: Block):
    """Skipped blocks too: an example never names a tracked folder (``benchmarks/``, ...) as its output."""
    for words in commands(block.code):
        for flag, value in zip(words, words[1:], strict=False):
            if flag in OUTPUT_FLAGS and not value.startswith("out/"):
                pytest.fail(f"{block}: `{shlex.join(words)}` writes {flag} {value}: examples write under out/")


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path: Path):
    """The runnable path, in README order, in an empty folder; the repository is left exactly as it was."""
    before = git_status()
    work = tmp_path / "newcomer"
    work.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",  # a block that needs a download must say so (<!-- docs: download -->)
        "TGATE_OV_CACHE": str(tmp_path / "ov-cache"),  # OpenVINO's compiled models: not in ~/.cache
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    ran = []
    for block in BLOCKS:
        if block.tags:
            continue
        start = time.perf_counter()
        argv = ["bash", "-e", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c", block.code]
        done = subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-4000:]
            pytest.fail(f"{block} failed (exit {done.returncode}):\n{block.code}\n--- output (tail) ---\n{tail}")
        ran.append(block.line)
        print(f"{block}: {time.perf_counter() - start:.1f} s")
    assert len(ran) >= 8, f"only {len(ran)} README blocks are runnable: the newcomer's path is gone"
    assert (work / "out").is_dir(), "the examples should write under out/"
    assert not [p for p in work.iterdir() if p.name != "out"], (
        f"examples wrote outside out/: {sorted(p.name for p in work.iterdir() if p.name != 'out')}"
    )
    after = git_status()
    if before is not None and after is not None:
        changed = sorted(after ^ before)
        assert not changed, f"README examples changed the repository (git status): {changed}"
