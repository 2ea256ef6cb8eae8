"""Per-call time of the two UNet graphs under ONNX Runtime settings (threads, graph optimisation level).

Profiles what limits the ORT pipeline on a CPU: one warm-up and ``--runs`` timed calls per setting, on
the same seeded inputs, all in one process so the settings compare side by side.

    python scripts/profile_ort.py /tmp/sd15-random --height 256 --width 256
    python scripts/profile_ort.py /tmp/sd15-random --levels all,fused --threads 0   # + ORT UNet fusions

``fused`` runs a copy of each graph rewritten by ONNX Runtime's transformer optimizer for UNets
(attention -> MultiHeadAttention, LayerNorm/GELU fusions), with the fusions that only have CUDA kernels
(GroupNorm, BiasSplitGelu, NHWC Conv, BiasAdd, packed QKV) turned off so the result runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tgate_trt import manifest as mf
from tgate_trt.export.onnx_io import random_feeds

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def feeds(m: mf.Manifest, key: str, lat_h: int, lat_w: int) -> dict[str, np.ndarray]:
    return random_feeds(m, key, lat_h, lat_w)


def fused_copy(src: Path, dst: Path) -> Path:
    """The graph after ORT's UNet fusions that have CPU kernels, saved with external data."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                 "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):  # fmt: skip
        setattr(opts, flag, False)
    model = optimize_model(str(src), model_type="unet", opt_level=0, optimization_options=opts, use_gpu=False)
    print(f"fused {src.name}: {model.get_fused_operator_statistics()}", flush=True)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=True)
    return dst / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path, help="an fp32 tgate-export folder")
    ap.add_argument("--height", type=int, default=256, help="image height (default: 256)")
    ap.add_argument("--width", type=int, default=256, help="image width (default: 256)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per setting, median kept (default: 3)")
    ap.add_argument("--threads", default="0,1,2", help="intra-op thread counts (0: ORT default; default: 0,1,2)")
    ap.add_argument(
        "--levels",
        default="basic,all",
        help="basic, extended, all, fused (all + ORT UNet fusions); default: basic,all",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=Path("out/profile_ort.json"),
        help="the rows (default: out/profile_ort.json; the published one is benchmarks/profile_ort.json)",
    )
    args = ap.parse_args()
    m = mf.Manifest.load(args.export, verify=False)
    lat_h, lat_w = m.latent_size(args.height, args.width)
    rows = []
    for key in (mf.PREGATE, mf.POSTGATE):
        inputs = feeds(m, key, lat_h, lat_w)
        reference = None  # the first setting's output: every other setting must compute the same
        for level in args.levels.split(","):
            path = args.export / m.graphs[key].file
            if level == "fused":
                path = fused_copy(path, Path(tempfile.mkdtemp(prefix=f"fused-{key}-")))
            for threads in (int(t) for t in args.threads.split(",")):
                opts = ort.SessionOptions()
                opts.graph_optimization_level = LEVELS.get(level, LEVELS["all"])
                opts.intra_op_num_threads = threads
                opts.log_severity_level = 3
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                first = sess.run([mf.NOISE_PRED], inputs)[0]
                reference = first if reference is None else reference
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    sess.run(None, inputs)
                    times.append(time.perf_counter() - start)
                diff = float(np.abs(first - reference).max())
                row = {"graph": key, "level": level, "threads": threads, "median_s": statistics.median(times),
                       "max_abs_diff": diff}  # fmt: skip
                rows.append(row)
                print(f"{key:<14} {level:<9} threads={threads}  {row['median_s']:.3f} s  diff {diff:.2e}", flush=True)
                del sess
            if level == "fused":
                shutil.rmtree(path.parent)
    args.json.write_text(json.dumps({"size": [args.height, args.width], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
