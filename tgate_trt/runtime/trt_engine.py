"""TensorRT backend of the runtime's :class:`Engine` interface, with torch CUDA tensors as I/O.

One engine per graph of the manifest (every UNet variant of the schedule, text encoder(s), VAE), one CUDA
stream for all of them, and one activation buffer shared by every execution context (only one engine runs
at a time). TensorRT and torch.cuda are imported lazily. A ``tgate-build --gated-unet`` build has one UNet
engine instead, and every variant is a view of it (:mod:`tgate_trt.engines.gated_views`; one copy of the weights
on the GPU, docs/tensorrt-weights.md); the text encoder(s) and VAE are as here.

**Zero-copy cache hand-off, for any capturing -> replaying variant.** Outputs are preallocated per engine and
returned as-is; the sampler (:func:`tgate_trt.methods.sampler.denoise`) keeps the capturing call's outputs
and feeds them to every later call that replays them, where they are bound by device address
(``set_tensor_address``): ``unet_c1``'s ``self_NN`` become ``unet_r1``'s inputs, ``unet_gate``'s ``cache_NN``
(and ``self_NN``) those of the post-gate variants, ``unet_post_r2_c1``'s ``self_NN`` those of
``unet_post_r12``. Nothing is copied. A returned tensor is overwritten by the same engine's next call, and
that is safe:

* The sampler keeps, per attention kind, the outputs of the last call that captured that kind, and the plan
  replays a kind only from its latest capture (a call that computes a kind without capturing it clears
  that kind's cache; a capture replaces it). So a capture of kind ``k`` by engine ``S`` at step ``i`` is
  read at a later step ``j`` only if every step strictly between ``i`` and ``j`` replays ``k`` too.
* A step that replays ``k`` runs a variant with ``k`` in its ``replay``. ``S`` has ``k`` in its ``capture``,
  and no variant both replays and captures one kind (a replayed site is cut from the graph;
  :func:`check_variants` refuses a manifest that says otherwise). So ``S`` does not run between ``i`` and
  ``j``, and its buffers still hold step ``i``'s capture when step ``j`` reads them. E.g. ``unet_c1``'s
  ``self_NN`` are replayed by several ``unet_r1`` calls, and the next ``unet_c1`` call (a new capture, or a
  warm-up call whose outputs nobody keeps) comes only after the last of them.
* Buffers are per engine, so one variant's call never touches another's outputs; the outputs a call
  returns but the plan does not keep (``noise_pred`` is read right away; captures nobody replays) are
  simply overwritten later. A run is one sampler loop at a time on these engines (the one stream and the
  shared activations need that anyway); the sampler's caches die with its run.

**CUDA graphs** (``cuda_graphs=True``, static plans only) bake input addresses into the captured graph. Inputs
that are another engine's output buffers (the caches) are bound by address and the graph is keyed by the
addresses of all inputs, so a variant fed caches from two producers (``unet_post_r12`` reads ``self_NN``
from ``unet_gate`` and later from ``unet_post_r2_c1`` when ``fi_interval > 1``) keeps one graph per producer
set, still without copying; every other input (sample, timestep, conditioning: fresh tensors) is copied into
an engine-owned buffer at a fixed address. Correctness never depends on telling the two apart: a graph only
replays for the exact input addresses it was captured with.

Not verifiable without TensorRT and a CUDA GPU (none here): execution itself, that TensorRT keeps every
bound address as given, and CUDA-graph capture/replay. The tests drive this class with a stand-in engine on
CPU tensors through the real sampler and plans (V1 and V2, one and two producers per replayed kind), which
checks the binding, buffer reuse and graph keying logic; ``tests/test_trt_backend.py`` runs the real build
and a V2 pipeline against ONNX Runtime where TensorRT and a GPU exist.
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
from ..engines.gated import GATED_KEY
from ..methods.variants import GraphVariant

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

    from ..engines.gated_views import GatedView

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


MAX_GRAPHS = 16  # CUDA graphs kept per engine (one per set of producer buffers; a run needs one or two)


class PlanMismatch(mf.ManifestError):
    """A plan does not belong to this TensorRT, this GPU, or the manifest's build."""


def check_section(section: Mapping[str, Any], manifest: mf.Manifest) -> None:
    """The build has a plan for every graph of the manifest (every UNet variant included) and no other, built
    for the same variants; the message names what is missing or different. Pure: testable without TRT."""
    plans = section.get("plans", {})
    served = plans.get(GATED_KEY, {}).get("variants", {})  # a gated build: one plan serves every variant
    missing = [k for k in manifest.graphs if k not in plans and k not in served]
    if missing:
        raise PlanMismatch(
            f"the engines have no plan for {', '.join(missing)} (the export's {manifest.schedule} graphs are "
            f"{', '.join(manifest.graphs)}): rebuild with tgate-build"
        )
    extra = [k for k in plans if k not in manifest.graphs and k != GATED_KEY]
    if extra:
        raise PlanMismatch(
            f"the engines have plans for {', '.join(extra)}, which this export does not have: they were built "
            "from another export; rebuild with tgate-build"
        )
    for key, variant in manifest.variants.items():
        built = plans[key].get("variant") if key in plans else served.get(key)
        if built is not None and built != variant:
            raise PlanMismatch(
                f"{key}: the plan was built for variant {built}, the export declares {variant}: rebuild with "
                "tgate-build"
            )


def check_variants(variants: list[GraphVariant]) -> None:
    """No variant replays a kind it also captures: the zero-copy hand-off's buffer reuse relies on it (see
    the module docstring)."""
    for v in variants:
        both = v.replay & {kind for kind, _ in v.capture}
        if both:
            raise mf.ManifestError(
                f"{v.key} both replays and captures {', '.join(sorted(both))}: a variant can't overwrite the "
                "caches it reads; re-export"
            )


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
            f"the engines section has no plan for {key} (it has {', '.join(plans) or 'none'}): rebuild with tgate-build"
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
    every context and bumps ``generation`` so captured CUDA graphs are re-captured. It also knows the
    engines' output buffers (``outputs``: address -> tensor), which a CUDA-graph engine binds by address
    instead of copying.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.contexts: list[trt.IExecutionContext] = []
        self.generation = 0
        self.outputs: dict[int, torch.Tensor] = {}

    def is_output(self, tensor: torch.Tensor) -> bool:
        """``tensor`` is (exactly) an engine's current output buffer."""
        owned = self.outputs.get(tensor.data_ptr())
        return owned is not None and owned.shape == tensor.shape and owned.dtype == tensor.dtype

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
        self.outputs: dict[str, torch.Tensor] = {}  # preallocated, returned as-is (zero-copy hand-off)
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._bound: dict[str, torch.Tensor] = {}  # what each input address points at (kept alive)
        self._staged: dict[str, torch.Tensor] = {}  # graph mode: engine-owned copies of non-engine inputs
        self._graphs: dict[tuple[int, ...], Any] = {}  # graph mode: input addresses -> captured graph
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

    def _bind_input(self, name: str, tensor: torch.Tensor) -> None:
        """Point ``name`` at ``tensor`` (another engine's output buffer: zero-copy), or, in graph mode, at an
        engine-owned copy of any other tensor (a fixed address for the captured graphs)."""
        import torch

        if self.cuda_graph and not self.shared.is_output(tensor):
            staged = self._staged.get(name)
            if staged is None:
                staged = self._staged[name] = torch.empty_like(tensor)
            staged.copy_(tensor)
            tensor = staged
        bound = self._bound.get(name)
        if bound is not None and bound.data_ptr() == tensor.data_ptr():
            self._bound[name] = tensor
            return  # the same buffer as last time (e.g. the same producer's caches): nothing to do
        self._bound[name] = tensor
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"{self.name}: TensorRT refused the address of input {name}")

    def _reshape(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        for name, shape in zip(self.input_names, shapes, strict=True):
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.name}: input {name} shape {shape} is outside the engine's profile")
        self._bound.clear()  # new shapes: every input is re-bound (and re-staged) below
        self._staged.clear()
        self._graphs.clear()
        for name in self.output_names:
            old = self.outputs.get(name)
            if old is not None:
                self.shared.outputs.pop(old.data_ptr(), None)
            dims = self.context.get_tensor_shape(name)
            self.outputs[name] = self._output_buffer(name, tuple(dims[i] for i in range(len(dims))))
            self.context.set_tensor_address(name, self.outputs[name].data_ptr())
        self._shapes = shapes

    def _output_buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A new buffer for output ``name``, known to ``shared`` as an engine output (zero-copy hand-off)."""
        import torch

        tensor = torch.empty(shape, dtype=self.dtypes[name], device=self.shared.device)
        self.shared.outputs[tensor.data_ptr()] = tensor
        return tensor

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
            if shapes != self._shapes:
                self._reshape(shapes)
            for name in self.input_names:
                self._bind_input(name, tensors[name])
            if self.cuda_graph:
                self._run_graph()
            else:
                self._execute()
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return dict(self.outputs)

    def _run_graph(self) -> None:
        """Replay the graph captured for exactly these input addresses, or run eagerly and capture one."""
        if self._graph_generation != self.shared.generation:  # the activation buffer moved
            self._graphs.clear()
            self._graph_generation = self.shared.generation
        key = tuple(self._bound[n].data_ptr() for n in self.input_names)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self._execute()  # eager run: this call's result, and the warm-up before capture
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.clear()
        self._graphs[key] = self._capture()

    def _capture(self) -> Any:
        """A CUDA graph of one ``execute_async_v3`` with the addresses bound now."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute()
        return graph

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
        raise RuntimeError(f"could not refit {onnx_path} into its weight-stripped plan: rebuild with tgate-build")


def load_engines(
    export_dir: str | os.PathLike[str],
    engines_dir: str | os.PathLike[str] | None = None,
    cuda_graphs: bool = False,
) -> dict[str, TrtEngine | GatedView]:
    """Every plan of a ``tgate-build`` folder (default ``EXPORT_DIR/engines``), checked, on one stream: one
    engine per graph of the manifest, every UNet variant included (a build missing one is refused); from a
    ``--gated-unet`` build, each variant is a view of the one ``unet_gated`` engine."""
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
    check_section(section, manifest)
    check_variants([GraphVariant.from_dict(k, v) for k, v in manifest.variants.items()])
    logger = trt_mod.Logger(trt_mod.Logger.WARNING)
    runtime = trt_mod.Runtime(logger)
    runtime.engine_host_code_allowed = bool(section["settings"]["engine_host_code_allowed"])
    shared, stream = SharedActivations(torch.device("cuda")), torch.cuda.Stream()
    gpu_name = torch.cuda.get_device_name()
    engines: dict[str, TrtEngine | GatedView] = {}
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
            raise PlanMismatch(f"TensorRT could not deserialize {folder / plan['file']}: rebuild with tgate-build")
        if section["settings"]["refit_from_onnx"]:
            refit_from_onnx(trt_mod, engine, root / plan["onnx"], logger)
        if key == GATED_KEY:  # every UNet variant a view of the one engine (eager: see gated_views)
            from ..engines.gated_views import gated_views

            engines.update(gated_views(manifest, plan, engine, shared, stream))
            continue
        engines[key] = TrtEngine(key, manifest.graphs[key], engine, shared, stream, cuda_graphs and section["static"])
    return engines
