"""``tgate-eval``: does T-GATE keep image quality? Judged on the ``shapes`` model, gate by gate.

The paper answers with FID on real weights; here the same question gets a reproducible answer: a fixed
prompt set (every colour x shape x position, fixed seeds) is generated with no gate and with each gate
step, and the deterministic judge scores colour, shape and position. The mean absolute pixel difference
to the no-gate image of the same seed shows how far gating moves each picture, and run times show the
price of each setting. Writes ``eval.json``, ``eval.md`` and a PNG grid (baseline beside gated).
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
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..export.shapes import data
from ..export.shapes.judge import accuracy
from .bench_report import ReportFiles, write_json

if TYPE_CHECKING:
    from .pipeline import TGatePipeline

DEFAULT_GATES = (2, 3, 5, 8, 10, 15)
MAX_SEEDS_PER_PROMPT = 100  # 7,500 images per run, every run's kept in memory for the grid
REPORT = ("eval.json", "eval.md", "grid.png")  # what --out receives; nothing else in it is touched


def generate(
    pipe: TGatePipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    gate: int,
    guidance: float | None,
    batch: int,
) -> tuple[list[np.ndarray], float]:
    """Images for ``prompts``; batch k draws its noise from a generator seeded with its first prompt's seed,
    so every run (baseline or gated) starts each image from the same noise."""
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        result = pipe(
            prompts[i : i + batch], num_inference_steps=steps, gate_step=gate, guidance_scale=guidance, seed=seeds[i]
        )
        images += [np.asarray(im) for im in result.images]
    return images, time.perf_counter() - start


def evaluate(
    pipe: TGatePipeline,
    gates: tuple[int, ...] = DEFAULT_GATES,
    steps: int = 25,
    guidance: float | None = None,
    seeds_per_prompt: int = 2,
    batch: int = 25,
) -> tuple[list[dict[str, Any]], dict[int, list[np.ndarray]], list[tuple[str, int, data.Spec]]]:
    """Rows of the quality table (baseline first) and every image, keyed by gate (``steps`` = no gate)."""
    from tqdm.auto import tqdm

    check_gates(steps, gates)
    limits.check_int("seeds_per_prompt", seeds_per_prompt, 1, MAX_SEEDS_PER_PROMPT)
    limits.check_batch(batch)
    items = data.prompt_set(seeds_per_prompt)
    prompts, seeds, specs = [p for p, _, _ in items], [s for _, s, _ in items], [sp for _, _, sp in items]
    images: dict[int, list[np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    generate(pipe, prompts[:batch], seeds, steps, 1, guidance, batch)  # warm-up: ORT's first calls are slow
    for gate in tqdm([steps, *gates], desc="eval runs", unit="run"):
        imgs, seconds = generate(pipe, prompts, seeds, steps, gate, guidance, batch)
        images[gate] = imgs
        base = images[steps]
        mad = float(np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(imgs, base, strict=True)]))
        rows.append(
            {
                "run": "no gate" if gate == steps else f"gate {gate}",
                "gate": gate,
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
    return "\n".join(lines) + "\n"


def grid(
    images: dict[int, list[np.ndarray]], items: list[tuple[str, int, data.Spec]], steps: int, path: Path, rows: int = 10
) -> None:
    """Baseline beside every gate for a spread of prompts."""
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
                ax.set_title("no gate" if gate == steps else f"gate {gate}", fontsize=9)
            if c == 0:
                ax.set_ylabel(items[idx][0].removeprefix("a "), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"T-GATE on shapes: {steps} steps, gate step per column", fontsize=10)
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


def parse_gates(text: str, steps: int) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        gates = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--gates takes comma-separated integers, e.g. 5,10; got {text!r}") from None
    return check_gates(steps, gates)


def build_parser() -> Parser:
    ap = Parser(prog="tgate-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="export folder of the shapes model (default: export it to OUT/export)")
    ap.add_argument("--gates", default=",".join(map(str, DEFAULT_GATES)), help="comma-separated gate steps")
    ap.add_argument("--steps", type=int, default=25, help=f"denoising steps, 2..{limits.MAX_STEPS}")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the export's)")
    ap.add_argument(
        "--seeds-per-prompt", type=int, default=2, help=f"75 prompts x this many seeds, 1..{MAX_SEEDS_PER_PROMPT}"
    )
    ap.add_argument("--batch", type=int, default=25, help=f"images per pipeline call, 1..{limits.MAX_BATCH}")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the backend's choice)")
    ap.add_argument("--backend", default="ort", choices=("ort", "openvino"), help="runtime backend")
    ap.add_argument("--engines", default=None, help="with --backend openvino: build folder (default: openvino)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/quality"), help=f"folder for {', '.join(REPORT)}")
    ap.add_argument(
        "--force",
        action="store_true",
        help=f"replace the {', '.join(REPORT)} of an earlier run (nothing else in --out)",
    )
    return ap


def check_args(args: argparse.Namespace) -> tuple[tuple[int, ...], ReportFiles]:
    """Everything that can be refused before an export is made or loaded."""
    gates = parse_gates(args.gates, args.steps)
    if args.guidance is not None:
        limits.check_float("--guidance", args.guidance, 0.0, limits.GUIDANCE_MAX)
    limits.check_int("--seeds-per-prompt", args.seeds_per_prompt, 1, MAX_SEEDS_PER_PROMPT)
    limits.check_int("--batch", args.batch, 1, limits.MAX_BATCH)
    limits.check_int("--threads", args.threads, 0, None, " (0: the backend's choice)")
    if args.engines is not None and args.backend != "openvino":
        raise UsageError("--engines names an OpenVINO build: use it with --backend openvino")
    report = ReportFiles(args.out, REPORT, "tgate-eval", force=args.force, sources=[args.export], report_keys=("rows",))
    report.check()
    if args.export is not None:
        if not (args.export / mf.MANIFEST_NAME).is_file():
            raise UsageError(
                f"{args.export} is not an export folder (no {mf.MANIFEST_NAME}); run tgate-export --model shapes"
            )
        mf.Manifest.load(args.export, verify=False)  # the schema; the pipeline checks the hashes
    elif (args.out / "export" / mf.MANIFEST_NAME).is_file():
        mf.Manifest.load(args.out / "export", verify=False)
    else:
        from ..export.exporter import ExportRequest, check_request

        check_request(ExportRequest("shapes", args.out / "export"))
    return gates, report


@command("tgate-eval")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    gates, report = check_args(args)
    with report as stage:  # locked for the run; the three files appear together at the end
        export = args.export
        if export is None:
            export = args.out / "export"
            if not (export / mf.MANIFEST_NAME).is_file():
                from ..export.exporter import ExportRequest, run_export

                run_export(ExportRequest("shapes", export))  # kept: the next run reuses it
        from .pipeline import TGatePipeline

        pipe = TGatePipeline.from_export(export, backend=args.backend, threads=args.threads, engines=args.engines)
        words = data.vocabulary()
        if any(len(pipe.tokenizer(w).input_ids) != 3 for w in words):  # start, word, end
            raise UsageError(
                f"{export} is not a shapes model (its tokenizer lacks the caption words); the judge only knows "
                "shapes images: export with tgate-export --model shapes"
            )
        builds = pipe.manifest.extra.get("engines", {})
        build = builds.get(args.engines or "openvino") if args.backend == "openvino" else None
        rows, images, items = evaluate(pipe, gates, args.steps, args.guidance, args.seeds_per_prompt, args.batch)
        guidance = args.guidance if args.guidance is not None else pipe.manifest.defaults["guidance_scale"]
        table = markdown(rows, len(items), args.steps, guidance)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["tgate-eval", *argv]),
            "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
            "export": str(export),
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
