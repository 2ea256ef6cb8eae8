"""Seconds per call of each graph of an export: ONNX Runtime fp32 against OpenVINO f32 and bf16, one sitting.

Calls alternate between the engines (round robin), so a noisy neighbour slows all of them alike; the table
gives medians after one warm-up call. OpenVINO graphs are compiled for the call's shapes, as the runtime does.

    python scripts/ov_percall.py /tmp/sd15-random --height 256 --width 256 --out benchmarks/openvino/percall
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tgate_trt import manifest as mf
from tgate_trt.engines.openvino import compile_config, import_openvino, supports_bf16
from tgate_trt.export.onnx_io import random_feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path, help="an export with an OpenVINO build (tgate-build --target openvino)")
    ap.add_argument("--build", default="openvino", help="OpenVINO build folder inside the export (default: openvino)")
    ap.add_argument("--height", type=int, default=256, help="image height (default: 256)")
    ap.add_argument("--width", type=int, default=256, help="image width (default: 256)")
    ap.add_argument("--calls", type=int, default=5, help="timed calls per graph (default: 5)")
    ap.add_argument("--out", type=Path, required=True, help="folder for percall.json and percall.png")
    args = ap.parse_args()
    import onnxruntime as ort

    ov = import_openvino()
    core = ov.Core()
    manifest = mf.Manifest.load(args.export, verify=False)
    lat = manifest.latent_size(args.height, args.width)
    precisions = ["f32", "bf16"] if supports_bf16(core) else ["f32"]
    rows = []
    for key in (mf.PREGATE, mf.POSTGATE, mf.VAE_DECODER):
        feeds = random_feeds(manifest, key, *lat)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(args.export / manifest.graphs[key].file), opts, ["CPUExecutionProvider"])
        runners = {"ORT fp32": lambda s=session, f=feeds: s.run(None, f)}
        for precision in precisions:
            model = core.read_model(str(args.export / args.build / f"{key}.xml"))
            model.reshape({n: ov.PartialShape(list(v.shape)) for n, v in feeds.items()})
            request = core.compile_model(model, "CPU", compile_config(precision, "CPU")).create_infer_request()
            runners[f"OpenVINO {precision}"] = lambda r=request, f=feeds: r.infer(f)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.calls + 1):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        rows.append({"graph": key, "seconds": medians, "calls": times})
        print(f"{key:<14} " + "  ".join(f"{n} {s:.3f}s" for n, s in medians.items()), flush=True)
        del session, runners
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"export": str(args.export), "size": f"{args.width}x{args.height}", "openvino": ov.get_version()}
    mf.atomic_write_text(args.out / "percall.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows[0]["seconds"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r["seconds"][name] for r in rows], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))], [r["graph"] for r in rows])
    ax.set_ylabel("median seconds per call")
    ax.set_title(f"{args.export.name}, {args.width}x{args.height}")
    ax.legend()
    fig.tight_layout()
    tmp = args.out / ".percall.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(args.out / "percall.png")
    print(f"wrote {args.out / 'percall.json'}, {args.out / 'percall.png'}")


if __name__ == "__main__":
    main()
