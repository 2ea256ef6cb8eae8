"""One weights file for every graph of an OpenVINO build: each weight written once, bound at load.

Why: every UNet variant of a pipeline carries (nearly) the whole UNet, so one IR per variant holds one copy
of the weights per variant, on disk and in memory. Here each graph's IR (``<key>.xml`` + ``<key>.bin``) keeps
its structure and its small constants (shapes, scalars: under :data:`MIN_SHARED_BYTES`), and every larger
constant becomes a ``Parameter`` whose bytes live in ``weights.bin``, stored once however many graphs use them
(deduplicated by content). The model's ``rt_info`` (:data:`RT_KEY`) maps each such parameter to its offset;
:func:`bind_weights` turns them back into constants that view one mapping of ``weights.bin``, so the graphs'
constants share memory (what lets the CPU plugin repack them once, :mod:`tgate_trt.runtime.ov_variants`).

MatMul weights are also stored transposed (``transpose_b``, ``[out, in]``, as PyTorch's ``Linear`` keeps them
and as optimum-intel's IR has them). The ONNX export has them ``[in, out]``; at bf16 the CPU plugin then
materializes a transposed bf16 copy per compiled graph beside its repacked one: measured on a 64 MiB weight,
73 MiB of memory against 41 MiB transposed, and that copy is never shared between graphs. The math is the
same (the f32 and bf16 outputs are bit-identical, measured).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

WEIGHTS_FILE = "weights.bin"
RT_KEY = "tgate_weights"  # model rt_info: parameter name -> offset in weights.bin
PARAM_PREFIX = "tgate_weight_"
MIN_SHARED_BYTES = 1024  # smaller constants (shapes, axes, scalars) stay in the graph's own .bin
ALIGN = 64  # offsets in weights.bin: cache-line (and AVX-512) aligned views of one page-aligned mapping


def transpose_matmul_weights(model: Any) -> int:
    """Store every constant 2-D MatMul weight as ``[out, in]`` with ``transpose_b``; returns how many."""
    import openvino as ov

    done: dict[int, Any] = {}
    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes()["transpose_b"]:
            continue
        src = op.input(1).get_source_output()
        const = src.get_node()
        if const.get_type_name() != "Constant" or len(src.get_partial_shape()) != 2:
            continue
        if id(const) not in done:
            done[id(const)] = ov.op.Constant(np.ascontiguousarray(const.get_data().T))
            done[id(const)].set_friendly_name(f"{const.get_friendly_name()}/transposed")
        op.input(1).replace_source_output(done[id(const)].output(0))
        op.set_attribute("transpose_b", True)
        op.validate_and_infer_types()
        count += 1
    model.validate_nodes_and_infer_types()
    return count


class WeightWriter:
    """Appends constants to ``weights.bin``, each distinct content once; ``offset`` of what it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._index: dict[bytes, int] = {}
        self.size = 0

    def add(self, data: np.ndarray) -> int:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        key = hashlib.sha256(raw.data).digest() + raw.nbytes.to_bytes(8, "little")
        if key not in self._index:
            pad = -self.size % ALIGN
            self._fh.write(b"\0" * pad)
            self._index[key] = self.size + pad
            self._fh.write(raw.data)
            self.size += pad + raw.nbytes
        return self._index[key]

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _shareable(const: Any) -> bool:
    """Large enough to matter, and of a type numpy can hand over byte for byte."""
    try:
        data = const.get_data()
    except (RuntimeError, TypeError):  # element types numpy lacks (bf16, u4, ...) stay in the graph's .bin
        return False
    return data.nbytes >= MIN_SHARED_BYTES and data.dtype.kind in "fiub" and data.nbytes == const.get_byte_size()


def externalize_weights(model: Any, writer: WeightWriter) -> int:
    """Move every large constant of ``model`` into ``writer``'s file; returns the bytes the graph references."""
    import openvino as ov

    params: list[Any] = []
    referenced = 0
    for const in model.get_ordered_ops():
        if const.get_type_name() != "Constant" or not _shareable(const):
            continue
        offset = writer.add(const.get_data())
        name = f"{PARAM_PREFIX}{len(params)}"
        param = ov.op.Parameter(const.get_element_type(), const.get_output_partial_shape(0))
        param.set_friendly_name(name)
        param.output(0).get_tensor().set_names({name})
        const.output(0).replace(param.output(0))
        model.set_rt_info(str(offset), [RT_KEY, name])
        params.append(param)
        referenced += const.get_byte_size()
    model.add_parameters(params)
    model.validate_nodes_and_infer_types()
    return referenced


def weight_ranges(model: Any) -> dict[str, tuple[int, int]]:
    """Parameter name -> (offset, bytes) in ``weights.bin`` for a model read from an externalized IR."""
    if not model.has_rt_info([RT_KEY]):
        return {}
    names = model.get_rt_info()[RT_KEY]
    sizes = {p.get_friendly_name(): p for p in model.get_parameters()}
    out = {}
    for name in names:
        param = sizes[name]
        count = math.prod(int(d) for d in param.get_output_shape(0))
        out[name] = (int(model.get_rt_info([RT_KEY, name]).astype(str)), count * param.get_element_type().size)
    return out


def map_weights(path: Path) -> np.ndarray:
    """``weights.bin`` mapped read-only: its pages are the page cache's, shared by every graph (and process)."""
    if path.stat().st_size == 0:  # nothing to map (and mmap refuses an empty file)
        return np.zeros(0, np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


def release_pages(weights: np.ndarray | None) -> None:
    """Drop the mapped weights' pages from this process once a compile is done. The CPU plugin has repacked
    (at bf16: converted) what its kernels read, so the file's own bytes sit unused in the process's resident
    memory: SD-1.5 V1 at bf16 held 3.9 GB of them after compiling (RSS 7.5 GB, 3.6 GB without them, the
    same time per step and the same latents). A page still read later faults back in from the file."""
    base = getattr(weights, "base", None)
    base = base.obj if isinstance(base, memoryview) else base  # np.frombuffer's base views the map
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


@contextmanager
def pages_released(weights: np.ndarray | None, period_s: float = 0.05) -> Iterator[None]:
    """Around a compile: drop the mapped pages every ``period_s`` while the plugin repacks, and once after.
    The plugin reads each weight once to repack it, so the pages it is done with need not wait for the end:
    without this the peak holds the whole file beside the repacked copies (SD-1.5 V1 bf16 peak 7.36 GiB).
    Dropping a page the plugin still reads only makes it fault back in from the page cache."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            release_pages(weights)

    thread = threading.Thread(target=loop, name="release-weight-pages", daemon=True)
    if weights is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        release_pages(weights)


def bind_weights(model: Any, weights: np.ndarray) -> None:
    """Replace the weight parameters of ``model`` by constants viewing ``weights`` (no copy).

    The caller keeps ``weights`` alive as long as any model or compiled model made from it: OpenVINO's
    constants point into the mapping without owning it.
    """
    import openvino as ov

    ranges = weight_ranges(model)
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    for name, (offset, size) in ranges.items():
        param = params[name]
        if offset + size > weights.size:
            raise ValueError(f"{name} lies outside {WEIGHTS_FILE} ({offset} + {size} > {weights.size} bytes)")
        tensor = ov.Tensor(weights[offset : offset + size], param.get_output_shape(0), param.get_element_type())
        const = ov.op.Constant(tensor, shared_memory=True)
        const.set_friendly_name(name)
        param.output(0).replace(const.output(0))
        model.remove_parameter(param)
    model.validate_nodes_and_infer_types()


def read_bound(core: Any, xml: Path, weights: np.ndarray | None) -> Any:
    """An IR of this build as a runnable model: its own .bin read by OpenVINO, its weights bound."""
    model = core.read_model(str(xml))
    if weights is not None:
        bind_weights(model, weights)
    elif weight_ranges(model):
        raise ValueError(f"{xml.name} takes its weights from {WEIGHTS_FILE}, which this build does not record")
    return model
