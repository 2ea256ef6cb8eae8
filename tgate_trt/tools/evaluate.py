"""``tgate-eval``: does T-GATE keep image quality? Judged on the ``shapes`` model, gate by gate.

The paper answers with FID on real weights; here the same question gets a reproducible answer: a fixed
prompt set (every colour x shape x position, fixed seeds) is generated with no gate and with each gate
step, and the deterministic judge scores colour, shape and position. The mean absolute pixel difference
to the no-gate image of the same seed shows how far gating moves each picture, and run times show the
price of each setting. ``--v2 G/SP/FI/WU,...`` adds T-GATE V2 rows (self-attention cached on a schedule
too; e.g. ``10/5/1/2``, the authors' defaults) beside the V1 gates, run on a ``--schedule v2`` export.
Writes ``eval.json``, ``eval.md`` and a PNG grid (baseline beside every setting).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf
from ..contract import limits
from ..contract.args import BackendArgs, OutputArgs, SamplingArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..methods.plan import TGateParams
from ..zoo.shapes import data
from ..zoo.shapes.judge import accuracy
from .bench_report import ReportFiles, write_json

if TYPE_CHECKING:
    from ..runtime.pipeline import TGatePipeline

DEFAULT_GATES = (2, 3, 5, 8, 10, 15)
MAX_SEEDS_PER_PROMPT = 100  # 7,500 images per run, every run's kept in memory for the grid
REPORT = ("eval.json", "eval.md", "grid.png")  # what --out receives; nothing else in it is touched
V2_EXPORT = "export-v2"  # default V2 export folder inside --out (the V1 one is "export")


def v1(gate: int) -> TGateParams:
    return TGateParams.v1(gate)


def label(params: TGateParams, steps: int) -> str:
    """A run's name in the table and the grid: ``no gate``, ``gate 5`` (V1) or ``V2 10/5/1/2``."""
    if (params.sp_interval, params.fi_interval, params.warm_up) != (1, 1, 0):
        return f"V2 {params.gate_step}/{params.sp_interval}/{params.fi_interval}/{params.warm_up}"
    return "no gate" if params.gate_step >= steps else f"gate {params.gate_step}"


def generate(
    pipe: TGatePipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    gate: int | TGateParams,
    guidance: float | None,
    batch: int,
) -> tuple[list[np.ndarray], float]:
    """Images for ``prompts``; batch k draws its noise from a generator seeded with its first prompt's seed,
    so every run (baseline or gated) starts each image from the same noise. ``gate``: a V1 gate step, or
    V1 / V2 parameters (always passed whole: a V2 export's defaults would cache self-attention)."""
    params = v1(gate) if isinstance(gate, int) else gate
    schedule = {"sp_interval": params.sp_interval, "fi_interval": params.fi_interval, "warm_up": params.warm_up}
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        result = pipe(
            prompts[i : i + batch], num_inference_steps=steps, gate_step=params.gate_step, guidance_scale=guidance,
            seed=seeds[i], **schedule,
        )  # fmt: skip
        images += [np.asarray(im) for im in result.images]
    return images, time.perf_counter() - start


def evaluate(
    pipe: TGatePipeline,
    gates: tuple[int, ...] = DEFAULT_GATES,
    steps: int = 25,
    guidance: float | None = None,
    seeds_per_prompt: int = 2,
    batch: int = 25,
    v2: tuple[TGateParams, ...] = (),
    v2_pipe: TGatePipeline | None = None,
) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]], list[tuple[str, int, data.Spec]]]:
    """Rows of the quality table (baseline first, then each V1 gate, then each V2 setting, run by ``v2_pipe``,
    default ``pipe``) and every image, keyed by the row's ``run`` label."""
    from tqdm.auto import tqdm

    check_gates(steps, gates)
    check_v2(steps, v2)
    limits.check_int("seeds_per_prompt", seeds_per_prompt, 1, MAX_SEEDS_PER_PROMPT)
    limits.check_batch(batch)
    items = data.prompt_set(seeds_per_prompt)
    prompts, seeds, specs = [p for p, _, _ in items], [s for _, s, _ in items], [sp for _, _, sp in items]
    images: dict[str, list[np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    runs = [(pipe, v1(steps)), *((pipe, v1(g)) for g in gates), *((v2_pipe or pipe, p) for p in v2)]
    generate(pipe, prompts[:batch], seeds, steps, 1, guidance, batch)  # warm-up: ORT's first calls are slow
    if v2 and v2_pipe is not None and v2_pipe is not pipe:
        generate(v2_pipe, prompts[:batch], seeds, steps, v2[0], guidance, batch)  # its graphs' first calls
    for runner, params in tqdm(runs, desc="eval runs", unit="run"):
        name = label(params, steps)
        imgs, seconds = generate(runner, prompts, seeds, steps, params, guidance, batch)
        images[name] = imgs
        base = images["no gate"]
        mad = float(np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(imgs, base, strict=True)]))
        schedule = "v1" if name.startswith(("no gate", "gate")) else "v2"
        rows.append(
            {
                "run": name,
                "gate": params.gate_step,
                "schedule": schedule,
                "sp_interval": params.sp_interval,
                "fi_interval": params.fi_interval,
                "warm_up": params.warm_up,
                **{k: round(v, 4) for k, v in accuracy(imgs, specs).items()},
                "mad_vs_baseline": round(mad, 3),
                "seconds": round(seconds, 2),
                "speedup": round(rows[0]["seconds"] / seconds, 3) if rows else 1.0,
            }
        )
    return rows, images, items


def markdown(rows: list[dict[str, Any]], n: int, steps: int, guidance: float) -> str:
    lines = [
        f"{n} prompts, {steps} steps, guidance {guidance:g}; accuracy by the judge (%), "
        "MAD = mean |pixel - no-gate pixel| (0-255)",
        "",
        "| run | colour | shape | position | all three | MAD vs no gate | seconds | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {100 * r['color']:.1f} | {100 * r['shape']:.1f} | {100 * r['position']:.1f} | "
            f"{100 * r['all']:.1f} | {r['mad_vs_baseline']:.2f} | {r['seconds']:.1f} | {r['speedup']:.2f}x |"
        )
    if any(r.get("schedule") == "v2" for r in rows):
        lines += ["", "V2 G/SP/FI/WU: gate, sp_interval, fi_interval, warm_up (self-attention cached on that schedule)"]
    return "\n".join(lines) + "\n"


def grid(
    images: dict[str, list[np.ndarray]], items: list[tuple[str, int, data.Spec]], steps: int, path: Path, rows: int = 10
) -> None:
    """Baseline beside every setting for a spread of prompts (``images`` keyed by run label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = list(images)
    picks = np.linspace(0, len(items) - 1, rows).round().astype(int)
    fig, axes = plt.subplots(rows, len(gates), figsize=(1.3 * len(gates) + 1.6, 1.3 * rows), squeeze=False)
    for r, idx in enumerate(picks):
        for c, gate in enumerate(gates):
            ax = axes[r][c]
            ax.imshow(images[gate][idx], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(gate, fontsize=9)
            if c == 0:
                ax.set_ylabel(items[idx][0].removeprefix("a "), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"T-GATE on shapes: {steps} steps, one setting per column", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # into the report's stage (ReportFiles), or with atomic_save
    plt.close(fig)


def check_gates(steps: int, gates: Sequence[int]) -> tuple[int, ...]:
    """Gate steps below ``steps``, each once: the no-gate run (gate >= steps) is always the table's first row."""
    limits.check_steps(steps, name="--steps")
    if not gates:
        raise UsageError("--gates is empty: name gate steps, e.g. 5,10")
    for g in gates:
        limits.check_int(
            "--gates", g, 1, steps - 1, f": a gate >= --steps ({steps}) is the no-gate run, which is always included"
        )
    if len(set(gates)) != len(gates):
        raise UsageError(f"--gates names a gate twice: {','.join(map(str, gates))}")
    return tuple(gates)


def check_v2(steps: int, settings: Sequence[TGateParams]) -> tuple[TGateParams, ...]:
    """V2 settings with a gate in ``1..steps`` (``steps``: self-attention caching alone), each once."""
    for p in settings:
        limits.check_int("--v2 gate", p.gate_step, 1, steps, f" (--steps is {steps})")
        if (p.sp_interval, p.fi_interval, p.warm_up) == (1, 1, 0):
            raise UsageError(
                f"--v2 {p.gate_step}/1/1/0 caches no self-attention: it is V1's gate {p.gate_step}; put it in --gates"
            )
    if len(set(settings)) != len(settings):
        raise UsageError("--v2 names a setting twice")
    return tuple(settings)


def parse_v2(text: str | None, steps: int) -> tuple[TGateParams, ...]:
    """``G/SP/FI/WU`` settings, comma-separated (gate, sp_interval, fi_interval, warm_up), e.g. ``10/5/1/2``."""
    if text is None:
        return ()
    settings = []
    for part in text.split(","):
        fields = part.strip().split("/")
        try:
            if len(fields) != 4:
                raise ValueError
            g, sp, fi, wu = (int(f) for f in fields)
        except ValueError:
            raise UsageError(
                f"--v2 takes GATE/SP/FI/WARMUP settings, comma-separated, e.g. 10/5/1/2; got {part.strip()!r}"
            ) from None
        limits.check_int("--v2 gate", g, 1, steps, f" (--steps is {steps})")
        limits.check_int("--v2 sp_interval", sp, 1, limits.MAX_STEPS, " (1 recomputes self-attention every step)")
        limits.check_int("--v2 fi_interval", fi, 1, limits.MAX_STEPS, " (1 recomputes self-attention every step)")
        limits.check_int("--v2 warm_up", wu, 0, limits.MAX_STEPS)
        settings.append(TGateParams(g, sp, fi, wu))
    return check_v2(steps, settings)


def parse_gates(text: str, steps: int) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        gates = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--gates takes comma-separated integers, e.g. 5,10; got {text!r}") from None
    return check_gates(steps, gates)


SAMPLING = SamplingArgs(steps=25, guidance=None)
BACKEND = BackendArgs(backends=("ort", "openvino"), engines=None)
OUTPUT = OutputArgs.report(Path("out/eval"), REPORT)
GROUPS = (SAMPLING, BACKEND, OUTPUT)


def build_parser() -> Parser:
    ap = Parser(prog="tgate-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="export folder of the shapes model (default: export it to OUT/export)")
    ap.add_argument("--gates", default=",".join(map(str, DEFAULT_GATES)), help="comma-separated gate steps")
    ap.add_argument(
        "--v2",
        metavar="G/SP/FI/WU,...",
        help="T-GATE V2 rows: gate/sp_interval/fi_interval/warm_up settings, comma-separated (e.g. 10/5/1/2, the "
        "authors' defaults); default: none",
    )
    ap.add_argument(
        "--v2-export",
        type=Path,
        help=f"--schedule v2 export of the shapes model for the --v2 rows (default: --export when it is V2, else "
        f"export it to OUT/{V2_EXPORT})",
    )
    ap.add_argument(
        "--seeds-per-prompt", type=int, default=2, help=f"75 prompts x this many seeds, 1..{MAX_SEEDS_PER_PROMPT}"
    )
    ap.add_argument("--batch", type=int, default=25, help=f"images per pipeline call, 1..{limits.MAX_BATCH}")
    for group in GROUPS:
        group.add_to(ap)
    return ap


def _check_export(folder: Path, made: str, schedule: str | None = None) -> mf.Manifest | None:
    """An export folder's manifest (schema only: the pipeline checks the hashes), or the export request
    that will make it when it is missing (``made``: the folder is ours to export into)."""
    from ..export.exporter import ExportRequest, check_request

    if (folder / mf.MANIFEST_NAME).is_file():
        return mf.Manifest.load(folder, verify=False)
    if made:
        check_request(ExportRequest("shapes", folder, schedule=schedule or "v1"))
        return None
    raise UsageError(f"{folder} is not an export folder (no {mf.MANIFEST_NAME}); run tgate-export --model shapes")


def check_args(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[TGateParams, ...], ReportFiles]:
    """Everything that can be refused before an export is made or loaded; fills in ``args.v2_export``."""
    parse(args, SAMPLING)
    gates = parse_gates(args.gates, args.steps)
    v2 = parse_v2(args.v2, args.steps)
    limits.check_int("--seeds-per-prompt", args.seeds_per_prompt, 1, MAX_SEEDS_PER_PROMPT)
    limits.check_int("--batch", args.batch, 1, limits.MAX_BATCH)
    parse(args, BACKEND, OUTPUT)
    if args.v2_export is not None and not v2:
        raise UsageError("--v2-export is the export of the --v2 rows: name them with --v2 G/SP/FI/WU")
    sources = [args.export, args.v2_export]
    report = ReportFiles(args.out, REPORT, "tgate-eval", force=args.force, sources=sources, report_keys=("rows",))
    report.check()
    manifest = _check_export(args.export or args.out / "export", "" if args.export else "made")
    if v2 and args.v2_export is None:
        if manifest is not None and manifest.schedule == "v2":
            args.v2_export = args.export or args.out / "export"
        elif args.export is not None:
            raise UsageError(
                f"--v2 rows need a --schedule v2 export: {args.export} is v1; make one with tgate-export --model "
                f"shapes --schedule v2 --out DIR and pass --v2-export DIR (or --export DIR for every row)"
            )
        else:
            args.v2_export = args.out / V2_EXPORT
    if v2:
        made = "" if args.v2_export != args.out / V2_EXPORT else "made"
        v2_manifest = _check_export(args.v2_export, made, "v2")
        if v2_manifest is not None and v2_manifest.schedule != "v2":
            raise UsageError(
                f"--v2 rows need a --schedule v2 export: {args.v2_export} is {v2_manifest.schedule}; make one "
                "with tgate-export --model shapes --schedule v2"
            )
    return gates, v2, report


def _pipeline(export: Path, schedule: str, args: argparse.Namespace) -> TGatePipeline:
    """The shapes model's pipeline from ``export``, exported there first when missing (and kept for the next run)."""
    from ..runtime.pipeline import TGatePipeline

    if not (export / mf.MANIFEST_NAME).is_file():
        from ..export.exporter import ExportRequest, run_export

        print(f"tgate-eval: exporting the shapes model to {export} (once: later runs reuse it)...", file=sys.stderr)
        run_export(ExportRequest("shapes", export, schedule=schedule))
    pipe = TGatePipeline.from_export(export, backend=args.backend, threads=args.threads, engines=args.engines)
    words = data.vocabulary()
    if any(len(pipe.tokenizer(w).input_ids) != 3 for w in words):  # start, word, end
        raise UsageError(
            f"{export} is not a shapes model (its tokenizer lacks the caption words); the judge only knows "
            "shapes images: export with tgate-export --model shapes"
        )
    return pipe


@command("tgate-eval")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    gates, v2, report = check_args(args)
    with report as stage:  # locked for the run; the three files appear together at the end
        export = args.export or args.out / "export"
        pipe = _pipeline(export, "v1", args)
        v2_pipe = None
        if v2:
            same = Path(args.v2_export).resolve() == Path(export).resolve()
            v2_pipe = pipe if same else _pipeline(args.v2_export, "v2", args)
        builds = pipe.manifest.extra.get("engines", {})
        build = builds.get(args.engines or "openvino") if args.backend == "openvino" else None
        rows, images, items = evaluate(
            pipe, gates, args.steps, args.guidance, args.seeds_per_prompt, args.batch, v2, v2_pipe
        )
        guidance = args.guidance if args.guidance is not None else pipe.manifest.defaults["guidance_scale"]
        table = markdown(rows, len(items), args.steps, guidance)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["tgate-eval", *argv]),
            "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
            "export": str(export),
            **({"v2_export": str(args.v2_export)} if v2 else {}),
            "backend": args.backend,
            **({k: build.get(k) for k in ("precision", "openvino", "device")} if build else {}),
            "steps": args.steps,
            "guidance": guidance,
            "prompts": len(items),
            "rows": rows,
        }
        write_json(stage / "eval.json", result)
        (stage / "eval.md").write_text(table)
        grid(images, items, args.steps, stage / "grid.png")
    print(table)
    print(f"wrote {', '.join(map(str, report.paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
