"""TensorRT backend of the runtime's :class:`Engine` interface, with torch CUDA tensors as I/O.

One CUDA stream for every engine, and one activation buffer shared by every execution context (only one
engine runs at a time). Outputs are preallocated per engine and returned as-is, so the pre-gate engine's
``cache_*`` outputs are the very tensors bound as the post-gate engine's inputs: the gate copies nothing.
A returned tensor is overwritten by the engine's next call. TensorRT and torch.cuda are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

ENGINES_DIR = "engines"
ENGINES_JSON = "engines.json"
TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


class PlanMismatch(mf.ManifestError):
    """A plan does not belong to this TensorRT, this GPU, or the manifest's build."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def check_plan(
    section: Mapping[str, Any], key: str, *, trt_version: str, gpu_name: str | None, plan_sha256: str
) -> None:
    """Refuse a plan that was not built for this runtime; the message shows expected and found values.

    Version-compatible plans run on the same or a later TensorRT of the same major version; hardware-
    compatible (``ampere+``) plans on any GPU (the build refuses pre-Ampere). Pure: testable without TRT.
    """
    plans = section.get("plans", {})
    if key not in plans:
        raise PlanMismatch(
            f"the engines section has no plan for {key} (it has {', '.join(plans) or 'none'}): "
            "rebuild with tgate-build"
        )
    expected = plans[key]["sha256"]
    if plan_sha256 != expected:
        raise PlanMismatch(
            f"{plans[key]['file']}: sha256 {plan_sha256[:16]}... does not match the manifest's "
            f"{expected[:16]}...: the plan was modified or rebuilt; rebuild with tgate-build"
        )
    options = section.get("options", {})
    built = str(section["tensorrt"])
    if options.get("version_compatible"):
        ok = _version(trt_version)[:1] == _version(built)[:1] and _version(trt_version) >= _version(built)
        rule = "a version-compatible plan needs the same major version, same or newer"
    else:
        ok, rule = trt_version == built, "a plan runs only on the TensorRT that built it"
    if not ok:
        raise PlanMismatch(
            f"{key}: plan built with TensorRT {built}, this is TensorRT {trt_version} ({rule}): "
            "rebuild with tgate-build here, or build with --version-compatible"
        )
    built_gpu = section.get("gpu", {}).get("name")
    if options.get("hardware_compat", "none") == "none" and built_gpu != gpu_name:
        raise PlanMismatch(
            f"{key}: plan built for GPU {built_gpu}, this GPU is {gpu_name}: rebuild with "
            "tgate-build on this GPU, or build with --hardware-compat ampere+"
        )


class SharedActivations:
    """One device buffer, sized to the largest ``device_memory_size_v2``, used by every context.

    Contexts are created with USER_MANAGED allocation and attached here; growing the buffer re-points
    every context and bumps ``generation`` so captured CUDA graphs are re-captured.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.contexts: list[trt.IExecutionContext] = []
        self.generation = 0

    @property
    def size(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def attach(self, context: trt.IExecutionContext, size: int) -> None:
        import torch

        self.contexts.append(context)
        if self.buffer is None or size > self.size:
            self.buffer = torch.empty(max(size, self.size, 256), dtype=torch.uint8, device=self.device)
            self.generation += 1
            targets = self.contexts
        else:
            targets = [context]
        for ctx in targets:
            ctx.set_device_memory(self.buffer.data_ptr(), self.size)


class TrtEngine:
    """A deserialized plan behind the :class:`Engine` protocol (inputs and outputs: torch CUDA tensors)."""

    def __init__(
        self,
        name: str,
        spec: mf.GraphSpec,
        engine: trt.ICudaEngine,
        shared: SharedActivations,
        stream: torch.cuda.Stream,
        cuda_graph: bool = False,
    ) -> None:
        import tensorrt as trt
        import torch

        self.name, self.spec, self.engine, self.shared, self.stream = name, spec, engine, shared, stream
        self.cuda_graph, self.calls, self.seconds = cuda_graph, 0, 0.0
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        shared.attach(self.context, engine.device_memory_size_v2)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: getattr(torch, TORCH_DTYPES[engine.get_tensor_dtype(n).name]) for n in names}
        self.outputs: dict[str, torch.Tensor] = {}  # preallocated, returned as-is (zero-copy gate)
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._bound: dict[str, torch.Tensor] = {}  # what each input address points at (kept alive)
        self._staged: set[str] = set()  # inputs copied into engine-owned buffers (graph mode)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_generation = -1

    def asarray(self, array: np.ndarray, name: str | None = None) -> torch.Tensor:
        import torch

        dtype = self.dtypes[name] if name is not None else None
        with torch.cuda.stream(self.stream):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.shared.device, dtype)

    def numpy(self, value: Any) -> np.ndarray:
        import torch

        self.stream.synchronize()
        tensor = value.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return np.asarray(tensor.cpu().numpy())

    def _bind_input(self, name: str, tensor: torch.Tensor) -> bool:
        """Point ``name`` at ``tensor``; True when a captured graph can no longer be replayed."""
        bound = self._bound.get(name)
        if bound is not None and bound.data_ptr() == tensor.data_ptr():
            return False  # the same tensor as last time (e.g. the pre-gate caches): nothing to do
        if self.cuda_graph and name in self._staged and bound is not None:
            bound.copy_(tensor)  # fixed address for the captured graph
            return False
        if self.cuda_graph and bound is not None:  # a second address: stage this input from now on
            tensor = tensor.clone()
            self._staged.add(name)
        self._bound[name] = tensor
        self.context.set_tensor_address(name, tensor.data_ptr())
        return True

    def _reshape(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        import torch

        for name, shape in zip(self.input_names, shapes, strict=True):
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.name}: input {name} shape {shape} is outside the engine's profile")
        self._bound.clear()  # new shapes: every input is re-bound (and re-staged) below
        self._staged.clear()
        for name in self.output_names:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            self.outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.shared.device)
            self.context.set_tensor_address(name, self.outputs[name].data_ptr())
        self._shapes = shapes

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.name}")

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        with torch.cuda.stream(self.stream):
            tensors = {n: self._to_tensor(n, feeds[n]) for n in self.input_names}
            shapes = tuple(tuple(tensors[n].shape) for n in self.input_names)
            stale = shapes != self._shapes
            if stale:
                self._reshape(shapes)
            for name in self.input_names:
                stale |= self._bind_input(name, tensors[name])
            if not self.cuda_graph:
                self._execute()
            elif stale or self._graph is None or self._graph_generation != self.shared.generation:
                self._execute()  # eager run: this call's result, and the warm-up before capture
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=self.stream):
                    self._execute()
                self._graph_generation = self.shared.generation
            else:
                self._graph.replay()
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return dict(self.outputs)

    def _to_tensor(self, name: str, value: Any) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            return self.asarray(value, name)
        if value.dtype != self.dtypes[name] or not value.is_contiguous():
            value = value.to(self.dtypes[name]).contiguous()
        return value


def refit_from_onnx(trt_mod: Any, engine: trt.ICudaEngine, onnx_path: Path, logger: trt.ILogger) -> None:
    """Put the ONNX weights into a weight-stripped plan (built with STRIP_PLAN + REFIT_IDENTICAL)."""
    refitter = trt_mod.Refitter(engine, logger)
    parser = trt_mod.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise RuntimeError(
            f"could not refit {onnx_path} into its weight-stripped plan: rebuild with tgate-build"
        )


def load_engines(
    export_dir: str | os.PathLike[str],
    engines_dir: str | os.PathLike[str] | None = None,
    cuda_graphs: bool = False,
) -> dict[str, TrtEngine]:
    """Every plan of a ``tgate-build`` folder (default ``EXPORT_DIR/engines``), checked, on one stream."""
    import torch

    from ..engines.build import import_tensorrt

    trt_mod = import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("the TensorRT backend needs a CUDA GPU visible to torch (a CUDA build of torch)")
    root = Path(export_dir)
    manifest = mf.Manifest.load(root, verify=True)
    folder = Path(engines_dir) if engines_dir is not None else root / ENGINES_DIR
    path = folder / ENGINES_JSON
    if path.is_file():
        section = json.loads(path.read_text())
    elif "plans" in manifest.extra.get("engines", {}):
        section = manifest.extra["engines"]
    else:
        raise mf.ManifestError(f"{path} does not exist: build engines first (tgate-build {root})")
    logger = trt_mod.Logger(trt_mod.Logger.WARNING)
    runtime = trt_mod.Runtime(logger)
    runtime.engine_host_code_allowed = bool(section["settings"]["engine_host_code_allowed"])
    shared, stream = SharedActivations(torch.device("cuda")), torch.cuda.Stream()
    gpu_name = torch.cuda.get_device_name()
    engines: dict[str, TrtEngine] = {}
    for key, plan in section["plans"].items():
        data = (folder / plan["file"]).read_bytes()
        check_plan(
            section,
            key,
            trt_version=str(trt_mod.__version__),
            gpu_name=gpu_name,
            plan_sha256=hashlib.sha256(data).hexdigest(),
        )
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise PlanMismatch(
                f"TensorRT could not deserialize {folder / plan['file']}: rebuild with tgate-build"
            )
        if section["settings"]["refit_from_onnx"]:
            refit_from_onnx(trt_mod, engine, root / plan["onnx"], logger)
        engines[key] = TrtEngine(
            key, manifest.graphs[key], engine, shared, stream, cuda_graphs and section["static"]
        )
    return engines
