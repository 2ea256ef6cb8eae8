"""Per-call time of the UNet variants on ONNX Runtime (CPU): one gated session (the runtime's default) against
a session per variant graph, interleaved in one process so the machine's drift hits both alike.

    python benchmarks/weights/percall_ort.py EXPORT --lat 32 --rounds 12 --out benchmarks/weights/percall-sd15-256.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from tgate_trt import manifest as mf
from tgate_trt.export.onnx_io import random_feeds
from tgate_trt.runtime.engine import OrtEngine
from tgate_trt.runtime.ort_gated import gated_views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--lat", type=int, default=32, help="latent height and width (32: 256x256 images)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    manifest = mf.Manifest.load(args.export)
    cpu = ["CPUExecutionProvider"]
    engines = {
        "separate": {
            k: OrtEngine(k, args.export / manifest.graphs[k].file, manifest.graphs[k], cpu, 0, "session")
            for k in manifest.variants
        },
        "gated": gated_views(args.export, manifest, cpu) or {},
    }
    feeds = {k: random_feeds(manifest, k, args.lat, args.lat) for k in manifest.variants}

    def call(mode: str, key: str) -> dict[str, np.ndarray]:
        engine = engines[mode][key]
        return {n: engine.numpy(v) for n, v in engine(feeds[key]).items()}

    diff = {}
    for key in manifest.variants:  # warm-up, and the outputs compared
        ref, got = call("separate", key), call("gated", key)
        diff[key] = max(float(np.abs(got[n] - ref[n]).max()) for n in ref)
    times: dict[tuple[str, str], list[float]] = {(m, k): [] for m in engines for k in manifest.variants}
    modes = list(engines)
    for r in range(args.rounds):
        for key in manifest.variants:
            for mode in modes if r % 2 == 0 else modes[::-1]:
                start = time.perf_counter()
                call(mode, key)
                times[(mode, key)].append(time.perf_counter() - start)
    rows = []
    print("| variant | separate sessions (ms) | gated session (ms) | ratio | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for key in manifest.variants:
        sep, gated = (statistics.median(times[(m, key)]) for m in ("separate", "gated"))
        row = {"variant": key, "separate_s": sep, "gated_s": gated, "ratio": gated / sep, "max_abs_diff": diff[key]}
        rows.append({**row, "separate_all": times[("separate", key)], "gated_all": times[("gated", key)]})
        print(f"| {key} | {sep * 1e3:.1f} | {gated * 1e3:.1f} | {gated / sep:.4f}x | {diff[key]:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"export": str(args.export), "lat": args.lat, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
