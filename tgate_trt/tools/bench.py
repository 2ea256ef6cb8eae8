"""``tgate-bench``: every way to run the same model, prompt, seed, steps and gate, side by side.

Each variant runs in its own process (so peak RSS is its own), does one warm-up run and then
``--runs`` timed runs; the table reports medians and ratios against diffusers (a) and against our own
no-gate baseline (c), because on a shared, noisy machine only ratios from one sitting compare. A
"Targets" section then sets T-GATE on OpenVINO (h) against the deployments a CPU user would otherwise
pick, and checks inside (d) and (h) whether a post-gate step costs what its MACs say it should.

T-GATE V2 rows (``b-v2``, ``b16-v2``, ``d-v2``, ``h-v2``, ``h-int8w-v2``) run the authors' package and ours
with self-attention cached too (``--sp-interval``, ``--fi-interval``, ``--warm-up``; the gate is ``--gate``),
ours on a ``--schedule v2`` export (``--v2-export``, or ``--export`` when it is one); a "V2" section sets them
against the authors' V2 and against their own V1 rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import platform
import queue as queue_mod
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract import limits
from ..contract.args import BackendArgs, OutputArgs, SamplingArgs, ScheduleArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..methods.plan import TGateParams
from .bench_report import (
    STAGES,
    V2,
    VARIANTS,
    ReportFiles,
    is_v2,
    json_safe,
    markdown,
    plot,
    targets,
    v2_params,
    write_json,
)
from .bench_torch import TORCH_VARIANTS, torch_variant

OV_BUILDS = {"g": "ov_build", "h": "ov_build", "h-int8w": "ov_int8w_build"}  # variant -> its build's argument
OV_BUILDS.update({k + V2: OV_BUILDS[k] for k in ("h", "h-int8w")})  # the same builds, inside the V2 export
V2_DEFAULTS = TGateParams.v2()  # the authors' defaults: gate 10, sp_interval 5, fi_interval 1, warm_up 2
OPENVINO_VARIANTS = ("f", *OV_BUILDS)
BENCH_TOOLS = ("torch", "onnxruntime", "openvino", "optimum-intel", "tgate")  # versions in bench.json
REPORT = ("bench.json", "bench.md", "bench.png")  # what --out receives; nothing else in it is touched
MAX_RUNS = 1000


def parse_variants(text: str) -> list[str]:
    """``a,b16,h-int8w`` (names), or the older letters-only form ``cdeq`` when there is no comma."""
    names = [n.strip() for n in text.split(",")] if "," in text or text in VARIANTS else list(text)
    unknown = [n for n in names if n not in VARIANTS]
    if not text.strip():
        raise UsageError(f"--variants is empty: name some of {','.join(VARIANTS)}")
    if unknown:
        raise UsageError(f"unknown variant {', '.join(map(repr, unknown))}: --variants takes {','.join(VARIANTS)}")
    return names


def export_of(kind: str, args: argparse.Namespace) -> Path:
    """The export a row of ours runs: the V2 export for a V2 row, the int8 copy for (q), else ``--export``."""
    if is_v2(kind):
        return args.v2_export
    return args.int8_export if kind == "q" else args.export


def ov_build_problem(args: argparse.Namespace, kind: str) -> str | None:
    """Why variant ``kind`` can't use its OpenVINO build (None if it can), read off the manifest only."""
    name = getattr(args, OV_BUILDS[kind])
    export = export_of(kind, args)
    precision = "int8w" if kind.startswith("h-int8w") else args.ov_precision
    make = f"tgate-build {export} --target openvino --precision {precision} --out {export / name}"
    builds = mf.Manifest.load(export, verify=False).extra.get("engines")
    section = builds.get(name) if isinstance(builds, dict) else None
    if not (export / name).is_dir() or not isinstance(section, dict) or section.get("target") != "openvino":
        return f"variant ({kind}) needs the OpenVINO build {export / name}: make it with {make}"
    if section.get("precision", precision) != precision:
        return f"variant ({kind}) needs a {precision} build, {name} is {section['precision']}: make one with {make}"
    return None


def openvino_problem(kind: str) -> str | None:
    """Why variant ``kind`` can't import what it needs (None if it can)."""
    needs = ("openvino", "optimum.intel") if kind == "f" else ("openvino",)
    for module in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"variant ({kind}) needs {module}: pip install -e '.[openvino]'"
    return None


def _ours(kind: str, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    from ..runtime.pipeline import TGatePipeline

    export = export_of(kind, args)
    if kind in OV_BUILDS:
        build = getattr(args, OV_BUILDS[kind])
        pipe = TGatePipeline.from_export(
            export, backend="openvino", threads=args.threads, engines=build, max_pixels=args.max_pixels
        )
    elif kind.startswith("d-sep"):  # the deployment before sharing: a copy of the weights and an arena per graph
        pipe = TGatePipeline.from_export(
            export, threads=args.threads, max_pixels=args.max_pixels, weights="separate", cpu_arena="session"
        )
    else:
        backend = "trt" if kind == "t" else "ort"
        pipe = TGatePipeline.from_export(export, backend=backend, threads=args.threads, max_pixels=args.max_pixels)
    gate = args.steps if kind in ("c", "g") else args.gate
    # V1 rows say V1 explicitly: a V2 export's own defaults would cache self-attention (even at gate >= steps)
    schedule = v2_params(args) if is_v2(kind) else {"sp_interval": 1, "fi_interval": 1, "warm_up": 0}

    def once() -> dict[str, float]:
        kw = {"seed": args.seed, "height": args.height, "width": args.width, **schedule}
        return pipe(args.prompt, num_inference_steps=args.steps, gate_step=gate, **kw).timings

    return once


def _peer(kind: str, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    """optimum's standard pipelines: (e) on ORT, (f) on OpenVINO; ``args.peer`` is what _prepare made."""
    from . import optimum_baseline as ob

    manifest = mf.Manifest.load(args.export, verify=False)  # the loaders check what they read
    if kind == "e":
        pipe = ob.load_pipeline(args.export, args.peer, args.threads)
        pipe.set_progress_bar_config(disable=True)  # ours shows none either; keeps the log readable
    else:
        from . import openvino_baseline as ovb

        pipe = ovb.load_pipeline(args.peer, args.export, args.ov_precision, args.threads, args.height, args.width)
    read = ob.stage_timer(pipe)

    def once() -> dict[str, float]:
        read()
        start = time.perf_counter()
        ob.generate(pipe, manifest, args.prompt, args.steps, args.seed, args.height, args.width)
        times = read()
        times["total"] = time.perf_counter() - start
        return times

    return once


def _prepare(kind: str, args: argparse.Namespace, folder: Path, queue: Any) -> None:
    """Export (e)'s plain UNet or (f)'s OpenVINO pipeline in its own process, so the row's peak RSS
    is the pipeline's, not the export's."""
    from . import optimum_baseline as ob

    try:
        manifest = mf.Manifest.load(args.export, verify=False)  # the row's worker checks the files
        if kind == "e":
            ob.check_export(manifest)
            path = ob.plain_unet(args.model, args.random_weights, folder)
        else:
            from . import openvino_baseline as ovb

            ob.check_export(manifest, ovb.PIPELINE)
            path = ovb.export_pipeline(args.model, args.random_weights, folder)
        queue.put({"ok": True, "path": str(path)})
    except Exception as exc:
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})


def _worker(kind: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        if kind in TORCH_VARIANTS:
            once = torch_variant(kind, args)
        elif kind in ("e", "f"):
            once = _peer(kind, args)
        else:
            once = _ours(kind, args)
        once()  # warm-up
        runs = [once() for _ in range(args.runs)]
        median = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        queue.put({"variant": kind, "ok": True, "median": median, "runs": runs, "peak_rss_gib": rss})
    except Exception as exc:  # a variant that can't run is reported, not fatal
        queue.put({"variant": kind, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})


def _spawn(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    """``target``'s result from its own process; a process that dies without one is reported, and an
    interrupted bench (Ctrl-C, SIGTERM) stops it rather than waiting for it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        while True:
            try:
                result: dict[str, Any] = queue.get(timeout=1.0)
                break
            except queue_mod.Empty:
                if not proc.is_alive():
                    try:
                        result = queue.get(timeout=1.0)
                    except queue_mod.Empty:
                        result = {"ok": False, "error": f"its process died with exit code {proc.exitcode}"}
                    break
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    proc.join()
    return result


def run_variant(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind not in ("e", "f"):
        result = _spawn(_worker, kind, args)
    else:
        keep = args.optimum_unet if kind == "e" else args.optimum_intel_dir
        with tempfile.TemporaryDirectory(prefix=f"tgate-bench-{kind}-") as tmp:
            prepared = _spawn(_prepare, kind, args, keep or Path(tmp) / "pipeline")
            if not prepared["ok"]:
                return {"variant": kind, **prepared}
            result = _spawn(_worker, kind, argparse.Namespace(**vars(args), peer=Path(prepared["path"])))
    result = {"variant": kind, **result}
    if kind in OPENVINO_VARIANTS:
        result["precision"] = "int8w" if kind.startswith("h-int8w") else args.ov_precision
    return result


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def choose_variants(args: argparse.Namespace) -> list[str]:
    """The asked-for variants after every cheap check, or the default set (saying what it leaves out)."""
    if args.variants is not None:
        names = parse_variants(args.variants)
        for kind in names:
            problem = (openvino_problem(kind) if kind in OPENVINO_VARIANTS else None) or (
                ov_build_problem(args, kind) if kind in OV_BUILDS else None
            )
            if problem:
                raise UsageError(problem)
    else:
        names = ["a", "b", "b16", "c", "d", "d-sep", "e"]
        group = [openvino_problem("f"), ov_build_problem(args, "h")]  # (f) goes with (g) and (h)
        extra = {"f,g,h": next((p for p in group if p), None)}
        extra["h-int8w"] = openvino_problem("h-int8w") or ov_build_problem(args, "h-int8w")
        for kinds, problem in extra.items():
            if problem:
                print(f"[bench] leaving out {kinds}: {problem}", file=sys.stderr)
            else:
                names += kinds.split(",")
        names += ["q"] if args.int8_export else []
        if getattr(args, "v2_export", None) is not None:  # a V2 export: the V2 rows that can run
            names += ["b-v2", "b16-v2", "d-v2", "d-sep-v2"]
            for kind in ("h-v2", "h-int8w-v2"):
                problem = openvino_problem(kind) or ov_build_problem(args, kind)
                if problem:
                    print(f"[bench] leaving out {kind}: {problem}", file=sys.stderr)
                else:
                    names.append(kind)
    if "q" in names:
        if args.int8_export is None:
            raise UsageError("variant (q) needs --int8-export DIR (made by: tgate-quantize EXPORT --out DIR)")
        if mf.QUANTIZATION not in mf.Manifest.load(args.int8_export, verify=False).extra:  # (q) verifies
            raise UsageError(f"{args.int8_export} is not a tgate-quantize copy: make one with tgate-quantize")
    return names


SAMPLING = SamplingArgs(steps=25, gate=10, seed=0, help={"seed": "noise seed of every run, 0..2**63-1"})
SIZE = SizeArgs(
    side=256, help={"max_pixels": "cap on height*width for our rows (default: the export's, 4x its native size)"}
)
SCHEDULE = ScheduleArgs(
    sp_interval=V2_DEFAULTS.sp_interval,
    fi_interval=V2_DEFAULTS.fi_interval,
    warm_up=V2_DEFAULTS.warm_up,
    context="the V2 rows, gated at --gate",
)
BACKEND = BackendArgs(threads_zero="the library's default; OpenVINO: every core")
OUTPUT = OutputArgs.report(Path("out/bench"), REPORT)
GROUPS = (SAMPLING, SIZE, SCHEDULE, BACKEND, OUTPUT)


def build_parser() -> Parser:
    ap = Parser(prog="tgate-bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="sd15", help="the model --export was made from (preset, diffusers folder or hub id)"
    )
    ap.add_argument(
        "--random-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the model's architecture with random weights (must match how --export was made)",
    )
    ap.add_argument("--export", type=Path, required=True, help="export folder of the same model (tgate-export)")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="prompt of every run")
    ap.add_argument("--runs", type=int, default=3, help=f"timed runs per variant after a warm-up, 1..{MAX_RUNS}")
    ap.add_argument(
        "--variants",
        help=f"comma-separated, from {','.join(VARIANTS)} (or letters only, e.g. cdeq); default: a,b,b16,c,d,d-sep,e, "
        "f,g,h with openvino and an OpenVINO build, h-int8w with its build, q with --int8-export, and with a V2 "
        "export b-v2,b16-v2,d-v2,d-sep-v2 (h-v2, h-int8w-v2 with their builds)",
    )
    ap.add_argument(
        "--optimum-unet",
        type=Path,
        help="folder to keep (and reuse) the plain UNet graph (e) needs (default: a temp folder, removed after)",
    )
    ap.add_argument(
        "--optimum-intel-dir",
        type=Path,
        help="folder to keep (and reuse) the OpenVINO pipeline (f) exports (default: a temp folder, removed after)",
    )
    ap.add_argument(
        "--ov-precision",
        choices=("bf16", "f32"),
        help="OpenVINO inference precision of (f), (g), (h) (default: bf16 where the CPU has it, else f32)",
    )
    ap.add_argument("--ov-build", default="openvino", help="OpenVINO build folder inside --export for (g), (h)")
    ap.add_argument("--ov-int8w-build", default="openvino-int8w", help="int8w OpenVINO build for (h-int8w)")
    ap.add_argument(
        "--v2-export",
        type=Path,
        help="--schedule v2 export of the same model, for the V2 rows (default: --export when it is one)",
    )
    ap.add_argument(
        "--mac-ratio", type=float, help="r = post/pre-gate MACs per step of V1, in (0, 1] (default: counted)"
    )
    ap.add_argument("--int8-export", type=Path, help="tgate-quantize copy of --export, for variant (q)")
    for group in GROUPS:
        group.add_to(ap)
    return ap


def check_args(args: argparse.Namespace) -> tuple[mf.Manifest, ReportFiles]:
    """Everything that can be refused before a variant runs: numbers, names and paths first (milliseconds),
    then the export's manifest, the variants' builds, and last the export's hashes."""
    from .optimum_baseline import check_keep_folder

    parse(args, *GROUPS)
    limits.check_int("--runs", args.runs, 1, MAX_RUNS)
    if args.mac_ratio is not None:
        limits.check_float("--mac-ratio", args.mac_ratio, 0.0, 1.0)
        if args.mac_ratio == 0:
            raise UsageError("--mac-ratio must be > 0 (post-gate MACs over pre-gate MACs per step)")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.variants is not None:
        parse_variants(args.variants)
    report = ReportFiles(
        args.out,
        REPORT,
        "tgate-bench",
        force=args.force,
        sources=[args.export, args.int8_export, args.optimum_unet, args.optimum_intel_dir, args.v2_export],
        report_keys=("meta", "results"),
    )
    report.check()
    check_keep_folder(args.optimum_unet, "--optimum-unet", [args.export, args.int8_export])
    check_keep_folder(args.optimum_intel_dir, "--optimum-intel-dir", [args.export, args.int8_export])
    manifest = mf.Manifest.load(args.export, verify=False)
    manifest.latent_size(args.height, args.width, args.max_pixels)
    check_v2_export(args, manifest)
    if args.ov_precision is None:
        from .openvino_baseline import default_precision

        args.ov_precision = default_precision()
    args.variants = choose_variants(args)
    if args.v2_export is not None and any(is_v2(k) and not k.startswith("b") for k in args.variants):
        mf.Manifest.load(args.v2_export)  # the hashes of the V2 export its rows read
    return mf.Manifest.load(args.export), report  # the hashes: every row reads these files


def check_v2_export(args: argparse.Namespace, manifest: mf.Manifest) -> None:
    """``--v2-export`` is a V2 export taking the size (default: ``--export`` if it is V2); a V2 row of ours
    asked for without one is refused, saying how to make it."""
    if args.v2_export is None:
        if manifest.schedule == "v2":
            args.v2_export = args.export
        else:
            ours = [k for k in parse_variants(args.variants or "a") if is_v2(k) and not k.startswith("b")]
            if ours:
                raise UsageError(
                    f"variant ({ours[0]}) needs a --schedule v2 export: {args.export} is {manifest.schedule}; make "
                    f"one with tgate-export --model {args.model} --schedule v2 --out DIR and pass --v2-export DIR"
                )
        return
    v2 = mf.Manifest.load(args.v2_export, verify=False)
    if v2.schedule != "v2":
        raise UsageError(
            f"--v2-export {args.v2_export} is a {v2.schedule} export: make a V2 one with tgate-export "
            f"--model {args.model} --schedule v2"
        )
    v2.latent_size(args.height, args.width, args.max_pixels)


@command("tgate-bench")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    manifest, report = check_args(args)
    with report as stage:  # locked for the sitting; the files appear together at the end
        results = []
        for kind in args.variants:
            print(f"[bench] ({kind}) {VARIANTS[kind]} ...", file=sys.stderr, flush=True)
            results.append(run_variant(kind, args))
        goals = targets(results, args)
        table = markdown(results, goals)
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {mp.cpu_count()} cores",
            "command": "tgate-bench " + " ".join(argv),
            "settings": {k: str(v) for k, v in vars(args).items() if k != "debug"},
            "tools": manifest.tools,  # the export's; then what the rows ran on
            "bench_tools": {name: _version(name) for name in BENCH_TOOLS},
        }
        data = {"meta": meta, "results": results, **({"targets": goals} if goals else {})}
        write_json(stage / "bench.json", json_safe(data))  # a row's NaN is recorded as null, not invalid JSON
        (stage / "bench.md").write_text(f"{table}\n")
        title = f"{args.model} {args.width}x{args.height}, {args.steps} steps, gate {args.gate}"
        if any(is_v2(k) for k in args.variants):
            title += ", V2 {sp_interval}/{fi_interval}/{warm_up}".format(**v2_params(args))
        plot(results, stage / "bench.png", title)
    print(table)
    print(f"wrote {', '.join(map(str, report.paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
