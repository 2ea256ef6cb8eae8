"""ONNX Runtime on the CPU: the UNet variants of one pipeline hold their weights once in memory.

Handing ORT one copy of the weights is not enough: at load, graph optimisation rewrites them per session
(convolution weights reordered to the NCHWc layout, constants folded) and MLAS pre-packs every MatMul weight
into a buffer of its own, so each session ends up with private copies (``benchmarks/README.md``). So the
variants are optimised once per machine and ORT version, ahead of time, and saved with their transformed
weights; :class:`~tgate_trt.export.onnx_io.SharedWeights` writes every distinct tensor once into one file,
named after its content. At load the file is memory-mapped once, every session is given the same tensors
through ``SessionOptions.add_initializer`` and runs with optimisation off and pre-packing off (MatMuls read
the shared weights in place). The optimised graphs are hardware-specific (NCHWc), so they live in a cache
outside the export, like OpenVINO's compiled models, keyed by the graphs' sha256, ORT's version and the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..contract.errors import OutputError
from ..contract.files import OutputDir, atomic_write_json

CACHE_ENV = "TGATE_ORT_CACHE"
WEIGHTS = "weights.bin"
RECORD = "prepared.json"
WEIGHT_MODES = ("shared", "separate")


def default_cache_dir() -> Path:
    """``$TGATE_ORT_CACHE``, else ``$XDG_CACHE_HOME/tgate-trt/ort`` (``~/.cache`` by default): outside the
    export, whose files are all under sha256 and whose Triton copy may be read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tgate-trt" / "ort"


def _cpu_flags() -> str:
    """The instruction sets the optimised graphs may depend on (MLAS picks kernels and NCHWc block sizes by them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(manifest: mf.Manifest, keys: Sequence[str]) -> str:
    import onnxruntime as ort

    facts = {
        "ort": ort.__version__,
        "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest(),
        "graphs": {k: manifest.graphs[k].files for k in keys},
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _optimise(src: Path, dst: Path) -> None:
    """ORT's full optimisation of one graph, saved with its (transformed) weights in an external file."""
    import onnxruntime as ort

    from ..contract.quiet import ort_log_level

    opts = ort.SessionOptions()
    opts.log_severity_level = max(ort_log_level(), 3)  # it warns that NCHWc graphs are hardware-specific
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.stem + ".bin")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def prepare(root: Path, manifest: mf.Manifest, keys: Sequence[str], cache_dir: Path, wait_s: float = 900) -> Path:
    """The folder of the optimised, weight-sharing graphs of ``keys``: made once (minutes at SD-1.5 size,
    published atomically), then reused. Another process preparing the same folder is waited for."""
    from ..export.onnx_io import ScratchDir, SharedWeights

    folder = cache_dir / cache_key(manifest, keys)
    deadline = time.monotonic() + wait_s
    while not (folder / RECORD).is_file():
        try:
            with OutputDir(folder, force=True, option="the ONNX Runtime cache") as tmp:
                with SharedWeights(tmp, WEIGHTS) as shared, ScratchDir(tmp) as scratch:
                    for key in keys:  # one optimised graph on disk at a time besides the shared file
                        _optimise(root / manifest.graphs[key].file, scratch / f"{key}.onnx")
                        shared.save(scratch / f"{key}.onnx", f"{key}.onnx", rename=True)
                        for done in scratch.iterdir():
                            done.unlink()
                    written, referenced = shared.written, shared.referenced
                atomic_write_json(
                    tmp / RECORD,
                    {"graphs": list(keys), "weights_bytes": written, "referenced_bytes": referenced},
                    indent=1,
                )
        except OutputError as exc:
            if "another process" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)  # another process is writing it: wait for its record
    return folder


class SharedOrtWeights:
    """One memory map of a prepared folder's weights, handed to every session that reads them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = np.memmap(folder / WEIGHTS, dtype=np.uint8, mode="r")
        self.values: dict[str, Any] = {}  # name -> OrtValue over the map; alive as long as the sessions

    def session_options(self, key: str, opts: Any) -> Any:
        """``opts`` set to run the prepared graph ``key`` as saved, on the shared tensors."""
        import onnx
        import onnxruntime as ort
        from onnx import helper

        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
        model = onnx.load(str(self.graph(key)), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if init.name not in self.values:
                where = {e.key: e.value for e in init.external_data}
                offset, length = int(where.get("offset", 0)), int(where["length"])
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                view = self.data[offset : offset + length].view(dtype).reshape(tuple(init.dims))
                self.values[init.name] = ort.OrtValue.ortvalue_from_numpy(view)
            opts.add_initializer(init.name, self.values[init.name])
        return opts

    def graph(self, key: str) -> Path:
        return self.folder / f"{key}.onnx"


def shared_weights(
    root: Path, manifest: mf.Manifest, keys: Sequence[str], cache_dir: str | Path | None
) -> SharedOrtWeights | None:
    """The shared weights of the UNet variants, or None where sharing does not apply (one variant, or the
    cache disabled with ``cache_dir=""``)."""
    if len(keys) < 2 or cache_dir == "":
        return None
    folder = prepare(root, manifest, keys, Path(cache_dir) if cache_dir else default_cache_dir())
    return SharedOrtWeights(folder)
