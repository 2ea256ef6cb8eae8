"""Export the SD-1.5 architecture (random weights, no download) and report graph sizes and timings.

Shows at full size what the tests show on ``tiny``: the post-gate graph drops exactly the cross-attention
weights. Needs ~9 GB RAM and a few minutes on 2 cores.

    python scripts/export_sd15_random.py --out exports/sd15-random --height 256 --width 256
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from tgate_trt import manifest as mf
from tgate_trt.export.exporter import ExportRequest, run_export
from tgate_trt.export.tgate import cross_attention_modules
from tgate_trt.export.validate import format_table
from tgate_trt.families import build_from_architecture


def torch_counts(preset: str) -> dict[str, int]:
    unet = build_from_architecture(preset).unet
    modules = dict(unet.named_modules())
    attn2 = cross_attention_modules(unet)
    norm2 = [name.rsplit(".", 1)[0] + ".norm2" for name in attn2]
    return {
        "unet": sum(p.numel() for p in unet.parameters()),
        "attn2": sum(p.numel() for n in attn2 for p in modules[n].parameters()),
        "norm2": sum(p.numel() for n in norm2 for p in modules[n].parameters()),
        "attn2_layers": len(attn2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", help="architecture, built with random weights (default: sd15)")
    ap.add_argument(
        "--out", type=Path, default=Path("out/sd15-random"), help="export folder (default: out/sd15-random)"
    )
    ap.add_argument("--height", type=int, default=256, help="export size (default: 256)")
    ap.add_argument("--width", type=int, default=256, help="export size (default: 256)")
    ap.add_argument("--dtype", default="fp32", help="fp32 or fp16 (default: fp32)")
    ap.add_argument(
        "--json",
        type=Path,
        default=Path("out/export_sd15_random.json"),
        help="the record (default: out/export_sd15_random.json; the published one is "
        "benchmarks/export_sd15_random.json)",
    )
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    counts = torch_counts(args.preset)
    start = time.perf_counter()
    req = ExportRequest(
        args.preset,
        args.out,
        args.dtype,
        height=args.height,
        width=args.width,
        random_weights=True,
        force=True,
    )
    manifest, checks = run_export(req, progress=lambda s: print(f"[{time.perf_counter() - start:7.1f}s] {s}"))
    seconds = time.perf_counter() - start
    print(format_table(checks))
    pre, post = manifest.graphs[mf.PREGATE].parameters, manifest.graphs[mf.POSTGATE].parameters
    sizes = {k: sum((args.out / f).stat().st_size for f in g.files) for k, g in manifest.graphs.items()}
    result = {
        "preset": args.preset,
        "dtype": args.dtype,
        "size": [args.height, args.width],
        "torch": counts,
        "onnx_parameters": {k: g.parameters for k, g in manifest.graphs.items()},
        "onnx_bytes": sizes,
        "pregate_minus_postgate": pre - post,
        "export_seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "torch_version": torch.__version__,
    }
    print(f"\n{'':<28}{'count':>16}")
    print(f"{'torch UNet parameters':<28}{counts['unet']:>16,}")
    print(f"{'torch attn2 parameters':<28}{counts['attn2']:>16,}  ({counts['attn2_layers']} layers)")
    print(f"{'torch norm2 (feeds attn2)':<28}{counts['norm2']:>16,}")
    print(f"{'ONNX pre-gate values':<28}{pre:>16,}")
    print(f"{'ONNX post-gate values':<28}{post:>16,}")
    print(f"{'pre - post':<28}{pre - post:>16,}  (attn2 + norm2 = {counts['attn2'] + counts['norm2']:,})")
    print(f"export {seconds:.0f} s, peak RSS {result['peak_rss_gib']} GiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if pre - post == counts["attn2"] + counts["norm2"] else 1


if __name__ == "__main__":
    sys.exit(main())
