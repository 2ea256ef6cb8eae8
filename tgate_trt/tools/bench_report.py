"""``tgate-bench``'s report: the table, the targets section (speed-ups and step-time ratios) and the plot.

Kept apart from the runner so that what is claimed from a sitting can be read (and tested) on its own.
It also holds :class:`ReportFiles`, how the report tools (``tgate-bench``, ``tgate-eval``,
``tgate-analyze``) publish their few named files into a folder that may hold other things.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import manifest as mf
from ..contract.errors import OutputError
from ..contract.files import acquire_lock, release_lock

VARIANTS = {
    "a": "diffusers PyTorch (no gate)",
    "b": "authors' tgate PyTorch",
    "b16": "authors' tgate PyTorch, bf16 autocast",
    "c": "ours ORT, gate >= steps",
    "d": "ours ORT, T-GATE",
    "d-sep": "ours ORT, T-GATE, weights loaded per graph (before sharing)",
    "e": "optimum ORTStableDiffusionPipeline",
    "f": "optimum-intel OVStableDiffusionPipeline",
    "g": "ours OpenVINO, gate >= steps",
    "h": "ours OpenVINO, T-GATE",
    "h-int8w": "ours OpenVINO int8 weights, T-GATE",
    "q": "ours ORT int8 MatMuls, T-GATE",
    "t": "ours TensorRT, T-GATE",
    # T-GATE V2 (self-attention cached on a schedule too): the authors' package and ours, same parameters
    "b-v2": "authors' tgate PyTorch, V2",
    "b16-v2": "authors' tgate PyTorch, bf16 autocast, V2",
    "d-v2": "ours ORT, T-GATE V2",
    "d-sep-v2": "ours ORT, T-GATE V2, weights loaded per graph (before sharing)",
    "h-v2": "ours OpenVINO, T-GATE V2",
    "h-int8w-v2": "ours OpenVINO int8 weights, T-GATE V2",
}
V2 = "-v2"  # a V2 row is its V1 row's name with this suffix, run with --sp-interval/--fi-interval/--warm-up
STAGES = ("text_encoder", "pregate", "postgate", "vae_decoder", "total")
TARGETS = (("f", 1.35), ("b16", 1.5), ("c", 4.0))  # (h) must be this many times faster than each
# (faster, than): V2 against the authors' V2 in the same sitting, and each V2 row against its V1 row
V2_PAIRS = (
    ("d-v2", "b-v2"), ("h-v2", "b-v2"), ("h-v2", "b16-v2"), ("h-int8w-v2", "b16-v2"),
    ("b-v2", "b"), ("b16-v2", "b16"), ("d-v2", "d"), ("h-v2", "h"), ("h-int8w-v2", "h-int8w"),
)  # fmt: skip
# weights held once: (ours, plain single-UNet peer of the same backend, the same pipeline with a copy per graph)
MEMORY_PAIRS = (("d", "e", "d-sep"), ("d-v2", "e", "d-sep-v2"), ("h", "f", None), ("h-v2", "f", None))
MEMORY_TARGET, SPEED_LOSS_TARGET = 1.15, 0.03
SD15_MAC_RATIO = 0.4716  # r of SD-1.5 at 256x256, when the graphs can't be counted
STEP_RATIO_TOLERANCE = 0.05


class ReportFiles:
    """``with ReportFiles(out, names, ...) as stage:`` write each of ``names`` into ``stage``; at the end they
    replace ``out/<name>`` together; nothing else in ``out`` is touched.

    A report folder is shared: ``benchmarks/quality`` keeps earlier sittings in subfolders beside
    ``eval.json``, ``benchmarks/analyze-shapes`` holds the prompt file its report was made from. So the
    tool owns its files, not the folder: :meth:`check` (call it before any expensive work) refuses a
    destination that can't be written, a folder inside a source the command reads, an output that is a
    source, and report files of an earlier run unless ``force`` (then only if the JSON is one of ours).
    The ``with`` block holds a lock for the whole run (a second writer fails at once), removes the staging
    folders of killed runs, stages the files and renames them into place only when all are written.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        names: Iterable[str],
        tool: str,
        force: bool = False,
        sources: Iterable[str | os.PathLike[str] | None] = (),
        report_keys: Iterable[str] = (),
        option: str = "--out",
    ) -> None:
        self.given = Path(out)
        self.folder = Path(os.path.abspath(self.given.expanduser()))
        self.names = tuple(names)
        self.tool, self.force, self.option = tool, force, option
        self.sources = [Path(s).expanduser().resolve() for s in sources if s is not None]
        self.report_keys = tuple(report_keys)  # what the JSON among ``names`` holds when it is ours
        self._lock: int | None = None
        self._stage: Path | None = None
        self._made: list[Path] = []

    @property
    def lock_path(self) -> Path:
        return self.folder / f".{self.tool}.lock"

    def _ours(self, path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in self.report_keys)

    def check(self) -> None:
        opt, given = self.option, self.given
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{opt} {given} exists and is not a folder: choose a folder for the report")
        ancestor = folder
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{opt} {given} lies under {ancestor}, which is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"{opt}: {ancestor} is not writable; choose another location")
        real = folder.resolve()
        for src in self.sources:
            if src.is_dir() and (real == src or src in real.parents):
                raise OutputError(
                    f"{opt} {given} is or lies inside {src}, which this command reads: choose a folder outside it"
                )
            if src in {(real / n) for n in self.names}:
                raise OutputError(f"{opt} {given} would overwrite {src}, which this command reads")
        existing = [n for n in self.names if os.path.lexists(folder / n)]
        for name in existing:
            if (folder / name).is_dir():
                raise OutputError(f"{opt} {given} holds a folder named {name}, where the report goes: move it")
        if existing and not self.force:
            raise OutputError(
                f"{opt} {given} already holds {', '.join(existing)} from an earlier run: pass --force to replace "
                f"{', '.join(self.names)} (nothing else in it), or choose another {opt}"
            )
        if existing:
            report = next((n for n in self.names if n.endswith(".json")), None)
            if report is not None and not self._ours(folder / report):
                raise OutputError(
                    f"{opt} {given} holds {', '.join(existing)} but no {report} of {self.tool}: "
                    "--force only replaces an earlier report; choose another folder"
                )
            for name in existing:
                if not os.access(folder / name, os.W_OK):
                    raise OutputError(f"{opt}: {folder / name} is read-only: it can't be replaced")

    # --- the lock, the stage and the swap -----------------------------------------------------------
    def _acquire(self) -> None:
        def busy(owner: str) -> OutputError:
            return OutputError(
                f"another {self.tool} (pid {owner}) is writing its report into {self.given}: wait for it "
                f"to finish, or choose another {self.option}"
            )

        self._lock = acquire_lock(self.lock_path, busy)

    def _release(self) -> None:
        if self._lock is not None:
            release_lock(self.lock_path, self._lock)
            self._lock = None

    def _remove_made(self) -> None:
        """The folders this run created, if nothing else went into them."""
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> Path:
        self.check()
        missing = []
        probe = self.folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made = list(reversed(missing))
            self._acquire()
            try:
                self.check()  # again under the lock: another writer may have published meanwhile
                for stale in self.folder.glob(f".{self.tool}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                    print(f"removed {stale}, left by an interrupted run", file=sys.stderr)
                self._stage = Path(tempfile.mkdtemp(prefix=f".{self.tool}.tmp-", dir=self.folder))
            except BaseException:
                self._release()
                raise
        except OSError as exc:  # a read-only mount, a full disk: what the mode bits didn't tell
            self._remove_made()
            raise OutputError(f"{self.option} {self.given} can't be written: {exc.strerror or exc}") from exc
        except BaseException:
            self._remove_made()
            raise
        return self._stage

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        stage = self._stage
        assert stage is not None
        try:
            if kind is None:
                missing = [n for n in self.names if not (stage / n).is_file()]
                if missing:
                    raise RuntimeError(f"{self.tool} did not write {', '.join(missing)}")
                for name in self.names:
                    os.chmod(stage / name, 0o644)
                    os.replace(stage / name, self.folder / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            self._release()
            if kind is not None:
                self._remove_made()

    @property
    def paths(self) -> list[Path]:
        return [self.folder / n for n in self.names]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity as ``None``: what a report records is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON (refusing NaN and infinity, which are not JSON)."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _label(r: dict[str, Any]) -> str:
    extra = f", {r['precision']}" if "precision" in r else ""
    return f"({r['variant']}) {VARIANTS[r['variant']]}{extra}"


def is_v2(kind: str) -> bool:
    return kind.endswith(V2)


def v2_params(args: argparse.Namespace) -> dict[str, int]:
    """The V2 rows' self-attention schedule (the gate is ``--gate``, shared with the V1 rows)."""
    return {k: getattr(args, k) for k in ("sp_interval", "fi_interval", "warm_up")}


def mac_ratio(args: argparse.Namespace, v2: bool = False) -> tuple[float, str]:
    """r = MACs of a post-gate step over a pre-gate step in the V1 (or, ``v2``, the V2) plan, counted off the
    export's graphs as ``tgate-macs`` does; off ``--model``'s architecture if the graphs can't be counted."""
    if args.mac_ratio is not None and not v2:
        return args.mac_ratio, "--mac-ratio"
    from . import macs

    plan = {"schedule": "v2", **v2_params(args)} if v2 else {"schedule": "v1"}
    what = f"the V2 plan ({'/'.join(str(v) for v in plan.values() if isinstance(v, int))}) " if v2 else ""
    export = args.v2_export if v2 else args.export
    size = f"{args.width}x{args.height}"
    try:
        unet = tuple(mf.Manifest.load(export, verify=False).variants)
        max_pixels = getattr(args, "max_pixels", None)
        run = macs.pipeline_macs(export, args.steps, args.gate, 1, args.height, args.width, max_pixels, **plan,
                                 graphs=unet)  # fmt: skip
        return run.ratio, f"{what}counted off the export's graphs at {size}"
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}"
    try:
        run = macs.model_macs(args.model, args.steps, args.gate, 1, args.height, args.width, **plan)
        return run.ratio, f"{what}counted off {args.model}'s architecture at {size} (the graphs: {failed})"[:300]
    except Exception as exc:  # the table still reports, against SD-1.5's V1 r
        if v2:
            return math.nan, f"{what}not counted ({type(exc).__name__}: {exc})"[:300]
        return SD15_MAC_RATIO, f"SD-1.5's r at 256x256 (counting failed: {failed})"[:300]


def targets(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """(h)'s speed-ups against its targets, each T-GATE row's post-/pre-gate step time ratio beside r, and the V2
    rows against the authors' V2 and against their own V1 rows."""
    ok = {r["variant"]: r for r in results if r["ok"]}
    speed = []
    if "h" in ok:
        for ref, target in TARGETS:
            if ref in ok:
                ratio = ok[ref]["median"]["total"] / ok["h"]["median"]["total"]
                speed.append({"vs": ref, "speedup": ratio, "target": target, "met": ratio >= target})
    kinds = ("h", "d", "h-v2", "d-v2")
    rows = [k for k in kinds if k in ok and 0 < args.gate < args.steps and ok[k]["median"]["pregate"] > 0]
    steps: dict[str, Any] = {}
    ratios: dict[bool, tuple[float, str]] = {}
    for kind in rows:
        if is_v2(kind) not in ratios:
            ratios[is_v2(kind)] = mac_ratio(args, is_v2(kind))
        r, source = ratios[is_v2(kind)]
        m = ok[kind]["median"]
        step = (m["postgate"] / (args.steps - args.gate)) / (m["pregate"] / args.gate)
        within = abs(step / r - 1) <= STEP_RATIO_TOLERANCE
        steps[kind] = {"step_time_ratio": step, "mac_ratio": r, "mac_ratio_source": source, "within_5pct": within}
    pairs = [
        {"faster": a, "than": b, "speedup": ok[b]["median"]["total"] / ok[a]["median"]["total"]}
        for a, b in V2_PAIRS
        if a in ok and b in ok
    ]
    goals: dict[str, Any] = {"speedups": speed, "step_ratios": steps} if speed or steps else {}
    if pairs:
        goals["v2"] = {**v2_params(args), "gate_step": args.gate, "pairs": pairs}
    memory = memory_goals(ok)
    if memory:
        goals["memory"] = memory
    return goals


def memory_goals(ok: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Weights held once: each of our rows' peak RSS against the plain single-UNet peer of its backend
    (<= 1.15x), and its time against the same pipeline holding a copy of the weights per graph (<= 3% slower)."""
    out = []
    for ours, peer, separate in MEMORY_PAIRS:
        if ours not in ok or peer not in ok:
            continue
        row: dict[str, Any] = {"ours": ours, "peer": peer}
        row["rss_ratio"] = ok[ours]["peak_rss_gib"] / ok[peer]["peak_rss_gib"]
        row["rss_met"] = row["rss_ratio"] <= MEMORY_TARGET
        if separate in ok:
            row["separate"] = separate
            row["rss_ratio_separate"] = ok[separate]["peak_rss_gib"] / ok[peer]["peak_rss_gib"]
            row["time_ratio"] = ok[ours]["median"]["total"] / ok[separate]["median"]["total"]
            row["speed_met"] = row["time_ratio"] <= 1 + SPEED_LOSS_TARGET
        out.append(row)
    return out


def markdown(results: list[dict[str, Any]], goals: dict[str, Any] | None = None) -> str:
    goals = goals or {}
    ok = {r["variant"]: r for r in results if r["ok"]}
    head = "| variant | text enc s | pre-gate s | post-gate s | VAE s | total s | vs (a) | vs (c) | peak RSS GiB |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {_label(r)} | not run: {r['error']} |||||||| ")
            continue
        m = r["median"]
        speed = [f"{ok[ref]['median']['total'] / m['total']:.2f}x" if ref in ok else "-" for ref in ("a", "c")]
        cells = " | ".join(f"{m[s]:.2f}" for s in STAGES)
        lines.append(f"| {_label(r)} | {cells} | {speed[0]} | {speed[1]} | {r['peak_rss_gib']:.2f} |")
    if goals.get("speedups") is not None or goals.get("step_ratios"):
        lines += ["", "## Targets"]
    if goals.get("speedups"):
        lines += ["", "| comparison | speed-up | target | |", "|---|---:|---:|---|"]
        for s in goals["speedups"]:
            met = "met" if s["met"] else "missed"
            lines.append(f"| (h) vs ({s['vs']}) | {s['speedup']:.2f}x | >= {s['target']:g}x | {met} |")
    if goals.get("step_ratios"):
        lines += ["", "| inside | post/pre-gate time per step | MAC ratio r | within 5% of r |", "|---|---:|---:|---|"]
        for kind, s in goals["step_ratios"].items():
            yes = "yes" if s["within_5pct"] else "no"
            lines.append(f"| ({kind}) | {s['step_time_ratio']:.4f} | {s['mac_ratio']:.4f} | {yes} |")
        sources = dict.fromkeys(s["mac_ratio_source"] for s in goals["step_ratios"].values())
        lines += [""] + [f"r: {source}" for source in sources]
    if goals.get("v2"):
        v2 = goals["v2"]
        lines += ["", "## V2", "", f"gate {v2['gate_step']}, sp_interval {v2['sp_interval']}, fi_interval "
                  f"{v2['fi_interval']}, warm_up {v2['warm_up']}; same sitting", ""]  # fmt: skip
        lines += ["| comparison | speed-up |", "|---|---:|"]
        lines += [f"| ({p['faster']}) vs ({p['than']}) | {p['speedup']:.2f}x |" for p in v2["pairs"]]
    if goals.get("memory"):
        lines += ["", "## Weights held once", "", f"peak RSS against the plain single-UNet peer (target <= "
                  f"{MEMORY_TARGET:g}x); time against the same pipeline with a copy of the weights per graph (target "
                  f"<= {1 + SPEED_LOSS_TARGET:g}x)", ""]  # fmt: skip
        lines += [
            "| ours | peer | peak RSS vs peer | before sharing | time vs before | |",
            "|---|---|---:|---:|---:|---|",
        ]
        for m in goals["memory"]:
            before = f"{m['rss_ratio_separate']:.2f}x" if "separate" in m else "-"
            time_ratio = f"{m['time_ratio']:.3f}x" if "separate" in m else "-"
            met = m["rss_met"] and m.get("speed_met", True)
            lines.append(f"| ({m['ours']}) | ({m['peer']}) | {m['rss_ratio']:.2f}x | {before} | {time_ratio} | "
                         f"{'met' if met else 'missed'} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["ok"]]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(ok) + 1.5))
    if not ok:  # the table says why each row did not run
        ax.text(0.5, 0.5, "no variant ran (see bench.md)", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title(title)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    labels = [_label(r) for r in ok]
    left = [0.0] * len(ok)
    for stage in STAGES[:-1]:
        vals = [r["median"][stage] for r in ok]
        ax.barh(labels, vals, left=left, label=stage)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, r in enumerate(ok):
        ax.text(r["median"]["total"], i, f" {r['median']['total']:.1f}s", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("median seconds per image")
    ax.set_title(title)
    ax.set_xlim(0, max(r["median"]["total"] for r in ok) * 1.15)  # room for the totals
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend sits below the axes, clear of the bars
    fig.savefig(path, dpi=120)  # into the report's stage (ReportFiles), or with atomic_save
    plt.close(fig)
