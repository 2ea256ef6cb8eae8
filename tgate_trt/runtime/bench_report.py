"""``tgate-bench``'s report: the table, the targets section (speed-ups and step-time ratios) and the plot.

Kept apart from the runner so that what is claimed from a sitting can be read (and tested) on its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import manifest as mf

VARIANTS = {
    "a": "diffusers PyTorch (no gate)",
    "b": "authors' tgate PyTorch",
    "b16": "authors' tgate PyTorch, bf16 autocast",
    "c": "ours ORT, gate >= steps",
    "d": "ours ORT, T-GATE",
    "e": "optimum ORTStableDiffusionPipeline",
    "f": "optimum-intel OVStableDiffusionPipeline",
    "g": "ours OpenVINO, gate >= steps",
    "h": "ours OpenVINO, T-GATE",
    "h-int8w": "ours OpenVINO int8 weights, T-GATE",
    "q": "ours ORT int8 MatMuls, T-GATE",
    "t": "ours TensorRT, T-GATE",
}
STAGES = ("text_encoder", "pregate", "postgate", "vae_decoder", "total")
TARGETS = (("f", 1.35), ("b16", 1.5), ("c", 4.0))  # (h) must be this many times faster than each
SD15_MAC_RATIO = 0.4716  # r of SD-1.5 at 256x256, when the graphs can't be counted
STEP_RATIO_TOLERANCE = 0.05


def _label(r: dict[str, Any]) -> str:
    extra = f", {r['precision']}" if "precision" in r else ""
    return f"({r['variant']}) {VARIANTS[r['variant']]}{extra}"


def mac_ratio(args: argparse.Namespace) -> tuple[float, str]:
    """r = post-gate / pre-gate MACs per UNet call, counted off the graphs as ``tgate-macs`` does."""
    if args.mac_ratio is not None:
        return args.mac_ratio, "--mac-ratio"
    from ..export import macs

    try:
        manifest = mf.Manifest.load(args.export, verify=False)
        lat = manifest.latent_size(args.height, args.width)
        pre, post = (
            macs.count_graph(args.export / manifest.graphs[k].file, macs._dims(manifest, k, 1, *lat)).total
            for k in (mf.PREGATE, mf.POSTGATE)
        )
        return post / pre, f"counted off the export's graphs at {args.width}x{args.height}"
    except Exception as exc:  # the table still reports, against SD-1.5's r
        return SD15_MAC_RATIO, f"SD-1.5's r at 256x256 (counting failed: {type(exc).__name__}: {exc})"[:300]


def targets(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """(h)'s speed-ups against its targets, and each T-GATE row's post-/pre-gate step time ratio beside r."""
    ok = {r["variant"]: r for r in results if r["ok"]}
    speed = []
    if "h" in ok:
        for ref, target in TARGETS:
            if ref in ok:
                ratio = ok[ref]["median"]["total"] / ok["h"]["median"]["total"]
                speed.append({"vs": ref, "speedup": ratio, "target": target, "met": ratio >= target})
    rows = [k for k in ("h", "d") if k in ok and 0 < args.gate < args.steps and ok[k]["median"]["pregate"] > 0]
    steps: dict[str, Any] = {}
    if rows:
        r, source = mac_ratio(args)
        for kind in rows:
            m = ok[kind]["median"]
            step = (m["postgate"] / (args.steps - args.gate)) / (m["pregate"] / args.gate)
            within = abs(step / r - 1) <= STEP_RATIO_TOLERANCE
            steps[kind] = {"step_time_ratio": step, "mac_ratio": r, "mac_ratio_source": source, "within_5pct": within}
    return {"speedups": speed, "step_ratios": steps} if speed or steps else {}


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
    if goals:
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
        lines += ["", f"r: {next(iter(goals['step_ratios'].values()))['mac_ratio_source']}"]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["ok"]]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(ok) + 1.5))
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
