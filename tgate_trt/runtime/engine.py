"""One small interface for "a compiled graph with named inputs and outputs", and its ORT backend.

The pipeline only ever sees :class:`Engine`: tensors it gets back are the backend's own (ORT
``OrtValue``s here, device tensors for TensorRT) and go straight into the next call, so cache tensors
cross the gate without a host copy. Host arrays enter through ``asarray`` and leave through ``numpy``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..contract.errors import UsageError
from ..contract.quiet import ort_log_level
from ..manifest import GraphSpec


@runtime_checkable
class Engine(Protocol):
    """A compiled graph. ``calls`` and ``seconds`` count what it ran, for timings and tests."""

    name: str
    spec: GraphSpec
    calls: int
    seconds: float

    def asarray(self, array: np.ndarray) -> Any: ...

    def numpy(self, value: Any) -> np.ndarray: ...

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


CPU_ARENAS = ("session", "shared", "off")
_shared_arena = False


def session_options(threads: int = 0, cpu_arena: str = "session") -> Any:
    """ONNX Runtime session options. ``cpu_arena``: ``session`` (ORT's default: an arena per session that
    keeps what it grew), ``shared`` (one arena registered with ORT's environment for every session, which a
    run with ``memory.enable_memory_arena_shrinkage`` gives back to the system: a server's choice), or
    ``off`` (plain malloc; measured 2x slower on a UNet step)."""
    import onnxruntime as ort

    global _shared_arena
    if cpu_arena not in CPU_ARENAS:
        raise UsageError(f"cpu_arena must be one of {', '.join(CPU_ARENAS)}, got {cpu_arena!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = ort_log_level()  # errors only; warnings too with --verbose
    if threads:
        opts.intra_op_num_threads = threads
    if cpu_arena == "shared":
        if not _shared_arena:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, None)
            _shared_arena = True
        opts.add_session_config_entry("session.use_env_allocators", "1")
    elif cpu_arena == "off":
        opts.enable_cpu_mem_arena = False
    return opts


class OrtEngine:
    """ONNX Runtime session driven through IO binding.

    Inputs are bound as ``OrtValue``s and outputs are left on the session's device, so on the CUDA
    provider latents and caches stay in GPU memory between steps.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        spec: GraphSpec,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        cpu_arena: str = "session",
    ) -> None:
        import onnxruntime as ort

        self.name, self.spec = name, spec
        opts = session_options(threads, cpu_arena)
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or default_providers()))
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.dtypes = {t.name: np.dtype(t.dtype) for t in [*spec.inputs, *spec.outputs]}
        self.output_names = [o.name for o in spec.outputs]
        self.calls, self.seconds = 0, 0.0

    def asarray(self, array: np.ndarray, name: str | None = None) -> Any:
        import onnxruntime as ort

        if name is not None:
            array = array.astype(self.dtypes[name], copy=False)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def numpy(self, value: Any) -> np.ndarray:
        return value.numpy()

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = self.asarray(value, name)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return outputs
