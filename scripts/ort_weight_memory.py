"""Does ONNX Runtime keep its own copy of a graph's weights on the CPU, even when handed a shared one?

Both UNet graphs together hold ~8 GiB in an ORT process for SD-1.5 in fp32. If ORT ran on user-supplied
initializers in place, the two sessions (and Triton instances) could share one memory-mapped copy. This
loads one graph three ways and reports the process's own (anonymous) memory next to mapped file pages:

    python scripts/ort_weight_memory.py /tmp/sd15-random/unet_pregate/model.onnx

Each mode runs in a fresh subprocess so the numbers do not mix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "shared", "shared-noprepack")


def memory_gib() -> dict[str, float]:
    """Rss, anonymous (the process's own copy) and file-backed pages, from the kernel's rollup."""
    keys = {"Rss:": "rss", "Anonymous:": "anonymous", "Private_Clean:": "file_pages"}
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in keys:
            out[keys[parts[0]]] = round(int(parts[1]) / 2**20, 2)
    return out


def mapped_initializers(path: Path) -> tuple[list[str], list[object], list[object]]:
    """Every external initializer as an OrtValue over a read-only memmap of its data file."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    maps: dict[str, np.memmap] = {}
    names, values, arrays = [], [], []
    for init in model.graph.initializer:
        if not uses_external_data(init):
            continue
        info = {e.key: e.value for e in init.external_data}
        file = info["location"]
        if file not in maps:
            maps[file] = np.memmap(path.parent / file, dtype=np.uint8, mode="r")
        start = int(info.get("offset", 0))
        raw = maps[file][start : start + int(info["length"])]
        array = raw.view(helper.tensor_dtype_to_np_dtype(init.data_type)).reshape(tuple(init.dims))
        names.append(init.name)
        arrays.append(array)  # keeps the buffers alive as long as the session
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return names, values, arrays


def measure(path: Path, mode: str) -> dict[str, object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    keep: object = None
    if mode != "plain":
        names, values, keep = mapped_initializers(path)
        opts.add_external_initializers(names, values)
    if mode == "shared-noprepack":
        opts.add_session_config_entry("session.disable_prepacking", "1")
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    result = {"mode": mode, "load_s": round(load_s, 1), **memory_gib()}
    del session, keep
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an exported graph, e.g. EXPORT/unet_pregate/model.onnx")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows here (default: none)")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"{args.model} is not a file; pass EXPORT/unet_pregate/model.onnx")
    if args.mode:
        print(json.dumps(measure(args.model, args.mode)))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, str(args.model), "--mode", mode], check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'mode':<18}{'load s':>8}{'RSS GiB':>9}{'own GiB':>9}{'file GiB':>9}")
    for r in rows:
        print(f"{r['mode']:<18}{r['load_s']:>8}{r['rss']:>9}{r['anonymous']:>9}{r['file_pages']:>9}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
