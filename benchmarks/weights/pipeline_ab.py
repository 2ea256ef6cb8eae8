"""Whole generations with the UNet variants' weights held once (``weights="shared"``, the default: on ONNX
Runtime one gated session, on OpenVINO one compiled model) against a copy per variant graph
(``weights="separate"``), both pipelines in one process and alternated, so drift between processes and over
time hits both alike (``tgate-bench`` runs each row in its own process, for its peak RSS).

    python benchmarks/weights/pipeline_ab.py EXPORT --rounds 4 --out benchmarks/weights/pipeline-ab-sd15-v1-256.json
    python benchmarks/weights/pipeline_ab.py EXPORT --backend openvino --out ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tgate_trt.runtime.pipeline import TGatePipeline

PROMPT = "a photograph of an astronaut riding a horse"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--gate", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backend", choices=("ort", "openvino"), default="ort")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    arena = {"cpu_arena": "session"} if args.backend == "ort" else {}  # ORT's own default before sharing
    pipes = {
        "shared": TGatePipeline.from_export(args.export, backend=args.backend),
        "separate": TGatePipeline.from_export(args.export, backend=args.backend, weights="separate", **arena),
    }
    kw = {"num_inference_steps": args.steps, "gate_step": args.gate, "seed": 0, "height": args.size, "width": args.size}
    for pipe in pipes.values():  # warm-up
        pipe(PROMPT, **kw)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in pipes}
    for r in range(args.rounds):
        for key in list(pipes) if r % 2 == 0 else list(pipes)[::-1]:
            runs[key].append(pipes[key](PROMPT, **kw).timings)
    rows = []
    print("| stage | weights held once (s) | a copy per graph (s) | ratio |")
    print("|---|---:|---:|---:|")
    for stage in ("pregate", "postgate", "total"):
        shared, separate = (statistics.median(t[stage] for t in runs[k]) for k in ("shared", "separate"))
        rows.append({"stage": stage, "shared_s": shared, "separate_s": separate, "ratio": shared / separate})
        print(f"| {stage} | {shared:.2f} | {separate:.2f} | {shared / separate:.4f}x |")
    if args.out:
        args.out.write_text(json.dumps({"export": str(args.export), "args": vars(args) | {"export": str(args.export),
                                        "out": str(args.out)}, "rows": rows, "runs": runs}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
