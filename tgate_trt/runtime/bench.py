"""``tgate-bench``: every way to run the same model, prompt, seed, steps and gate, side by side.

Each variant runs in its own process (so peak RSS is its own), does one warm-up run and then
``--runs`` timed runs; the table reports medians and ratios against diffusers (a) and against our own
no-gate baseline (c), because on a shared, noisy machine only ratios from one sitting compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import manifest as mf

VARIANTS = {
    "a": "diffusers PyTorch (no gate)",
    "b": "authors' tgate PyTorch",
    "c": "ours ORT, gate >= steps",
    "d": "ours ORT, T-GATE",
    "e": "optimum ORTStableDiffusionPipeline",
    "q": "ours ORT int8 MatMuls, T-GATE",
    "t": "ours TensorRT, T-GATE",
}
STAGES = ("text_encoder", "pregate", "postgate", "vae_decoder", "total")


class StageTimer:
    """Forward hooks that add up wall time per PyTorch module, for per-stage times of torch pipelines."""

    def __init__(self, pipe: Any, gate: int) -> None:
        self.gate, self.unet_calls = gate, 0
        self.times: dict[str, float] = {}
        self._start: dict[str, float] = {}
        for name in ("text_encoder", "unet", "vae"):
            module = getattr(pipe, name)
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        # the VAE decode path is not a forward call: time it through decode
        vae, decode = pipe.vae, pipe.vae.decode

        def timed_decode(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = decode(*a, **k)
            self.times["vae_decoder"] = self.times.get("vae_decoder", 0.0) + time.perf_counter() - t
            return out

        vae.decode = timed_decode

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            key = name
            if name == "unet":  # UNet calls from the gate on are the post-gate steps
                key = "pregate" if self.unet_calls < self.gate else "postgate"
                self.unet_calls += 1
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - self._start[name]

        return hook


def _torch_variant(kind: str, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    import torch

    from ..export.models import resolve_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = resolve_model(args.model, args.random_weights).pipe
    timer = StageTimer(pipe, args.gate if kind == "b" else args.steps)
    kw = {"num_inference_steps": args.steps, "height": args.height, "width": args.width, "output_type": "pil"}
    if kind == "b":
        from tgate import TgateSDLoader

        pipe = TgateSDLoader(pipe)

    def once() -> dict[str, float]:
        timer.times.clear()
        timer.unet_calls = 0
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        if kind == "a":
            pipe(args.prompt, generator=gen, **kw)
        else:
            pipe.tgate(args.prompt, gate_step=args.gate, sp_interval=1, fi_interval=1, warm_up=0, generator=gen, **kw)
        times = dict(timer.times)
        times["total"] = time.perf_counter() - start
        return times

    return once


def _ours(kind: str, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    from .pipeline import TGatePipeline

    backend = "trt" if kind == "t" else "ort"
    export = args.int8_export if kind == "q" else args.export
    pipe = TGatePipeline.from_export(export, backend=backend, threads=args.threads)
    gate = args.steps if kind == "c" else args.gate

    def once() -> dict[str, float]:
        r = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            gate_step=gate,
            seed=args.seed,
            height=args.height,
            width=args.width,
        )
        return r.timings

    return once


def _optimum(args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    from . import optimum_baseline as ob

    manifest = mf.Manifest.load(args.export, verify=False)  # load_pipeline verifies the files
    pipe = ob.load_pipeline(args.export, args.plain_unet, args.threads)
    pipe.set_progress_bar_config(disable=True)  # ours shows none either; keeps the log readable
    read = ob.stage_timer(pipe)

    def once() -> dict[str, float]:
        read()
        start = time.perf_counter()
        ob.generate(pipe, manifest, args.prompt, args.steps, args.seed, args.height, args.width)
        times = read()
        times["total"] = time.perf_counter() - start
        return times

    return once


def _prepare_optimum(args: argparse.Namespace, folder: Path, queue: Any) -> None:
    """Export optimum's plain UNet in its own process, so (e)'s peak RSS is the pipeline's, not the export's."""
    from . import optimum_baseline as ob

    try:
        ob.check_export(mf.Manifest.load(args.export, verify=False))  # (e)'s worker verifies the files
        path = ob.plain_unet(args.model, args.random_weights, folder)
        queue.put({"ok": True, "path": str(path)})
    except Exception as exc:
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})


def _worker(kind: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        if kind in ("a", "b"):
            once = _torch_variant(kind, args)
        elif kind == "e":
            once = _optimum(args)
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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_variant(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind != "e":
        return _spawn(_worker, kind, args)
    with tempfile.TemporaryDirectory(prefix="tgate-bench-unet-") as tmp:
        prepared = _spawn(_prepare_optimum, args, args.optimum_unet or Path(tmp))
        if not prepared["ok"]:
            return {"variant": kind, **prepared}
        return _spawn(_worker, kind, argparse.Namespace(**vars(args), plain_unet=Path(prepared["path"])))


def markdown(results: list[dict[str, Any]]) -> str:
    ok = {r["variant"]: r for r in results if r["ok"]}
    head = "| variant | text enc s | pre-gate s | post-gate s | VAE s | total s | vs (a) | vs (c) | peak RSS GiB |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        name = f"({r['variant']}) {VARIANTS[r['variant']]}"
        if not r["ok"]:
            lines.append(f"| {name} | not run: {r['error']} |||||||| ")
            continue
        m = r["median"]
        speed = [f"{ok[ref]['median']['total'] / m['total']:.2f}x" if ref in ok else "-" for ref in ("a", "c")]
        cells = " | ".join(f"{m[s]:.2f}" for s in STAGES)
        lines.append(f"| {name} | {cells} | {speed[0]} | {speed[1]} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["ok"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ok) + 1.5))
    labels = [f"({r['variant']}) {VARIANTS[r['variant']]}" for r in ok]
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tgate-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument(
        "--random-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the model's architecture with random weights (must match how --export was made)",
    )
    ap.add_argument("--export", type=Path, required=True, help="export folder of the same model (tgate-export)")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--gate", type=int, default=10)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    ap.add_argument("--variants", help="letters of the variants to run (default: abcde, and q with --int8-export)")
    ap.add_argument(
        "--optimum-unet",
        type=Path,
        help="folder to keep (and reuse) the plain UNet graph (e) needs (default: a temp folder, removed after)",
    )
    ap.add_argument("--int8-export", type=Path, help="tgate-quantize copy of --export, for variant (q)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/cpu"))
    args = ap.parse_args(argv)
    try:
        mf.check_gate(args.steps, args.gate)
        manifest = mf.Manifest.load(args.export)
        manifest.latent_size(args.height, args.width)
        args.variants = args.variants or ("abcdeq" if args.int8_export else "abcde")
        if "q" in args.variants:
            if args.int8_export is None:
                raise ValueError("variant (q) needs --int8-export DIR (made by: tgate-quantize EXPORT --out DIR)")
            if mf.QUANTIZATION not in mf.Manifest.load(args.int8_export, verify=False).extra:  # (q) verifies
                raise ValueError(f"{args.int8_export} is not a tgate-quantize copy: make one with tgate-quantize")
    except (mf.ManifestError, ValueError) as exc:
        print(f"tgate-bench: error: {exc}", file=sys.stderr)
        return 2
    if args.runs < 1 or set(args.variants) - set(VARIANTS):
        print(f"tgate-bench: error: --runs >= 1 and --variants from {''.join(VARIANTS)}", file=sys.stderr)
        return 2
    results = []
    for kind in args.variants:
        print(f"[bench] ({kind}) {VARIANTS[kind]} ...", file=sys.stderr, flush=True)
        results.append(run_variant(kind, args))
    table = markdown(results)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {mp.cpu_count()} cores",
        "command": "tgate-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "tools": manifest.tools,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    mf.atomic_write_text(args.out / "bench.json", json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    mf.atomic_write_text(args.out / "bench.md", f"{table}\n")
    title = f"{args.model} {args.width}x{args.height}, {args.steps} steps, gate {args.gate}"
    plot(results, args.out / "bench.png", title)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
