"""The TensorRT runtime's side of the gated UNet: every graph variant is a view of the one ``unet_gated`` engine.

One deserialized engine holds the UNet weights once. Each view (one per variant of the manifest) has its own
execution context on the engine's optimization profile for its CFG setting (``N = 2B`` or ``B``), attached to
the shared activation buffer like every other context; it turns the variant's inputs into the gated inputs
and the gated outputs into the variant's outputs with :func:`.gated.gated_feeds` and
:func:`.gated.variant_outputs` (the mapping the tests check against ONNX Runtime), in torch on the engines'
stream.

Buffers keep the zero-copy hand-off of :mod:`tgate_trt.runtime.trt_engine` as it was: a view owns the output
buffers it hands on as they are (a whole-batch capture, the noise of a view without CFG), so a capture stays
valid until the same variant runs again, exactly as with one engine per variant; every other gated output
(sites the view does not capture, the 2B tensors a CFG mean or the guidance combination reads right after
the call) goes to scratch shared by all views, since only one call runs at a time. Inputs a view does not
read (the caches of kinds it computes, text states it ignores) all point at one zero buffer.

Views run eagerly: whether TensorRT can capture an engine with conditionals in a CUDA graph is not verified
(no GPU here; see docs/tensorrt-weights.md). TensorRT and torch are imported lazily.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf
from ..methods.variants import GraphVariant
from ..runtime.trt_engine import SharedActivations, TrtEngine
from .gated import GatedSpec, gated_feeds, kept_outputs, selector, variant_outputs

if TYPE_CHECKING:
    import tensorrt as trt
    import torch


class Scratch:
    """Output buffers no view hands on, one per (name, shape, dtype), shared by every view."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.buffers: dict[tuple[str, tuple[int, ...], Any], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        key = (name, shape, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self.buffers[key]


class TorchOps:
    """:class:`.gated.ArrayOps` for torch tensors on the engines' device; zeros are views of one buffer
    (TensorRT only reads inputs), flags are cached scalars (on the host where the engine wants them there)."""

    def __init__(self, device: Any, host_flags: bool = False) -> None:
        self.device, self.host_flags = device, host_flags
        self._zeros: dict[Any, torch.Tensor] = {}
        self._flags: dict[bool, torch.Tensor] = {}

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([a, b])

    def zeros(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        import torch

        kind = getattr(torch, dtype)
        numel = int(np.prod(shape))
        buf = self._zeros.get(kind)
        if buf is None or buf.numel() < numel:
            buf = self._zeros[kind] = torch.zeros(max(numel, 1), dtype=kind, device=self.device)
        return buf[:numel].view(shape)

    def flag(self, value: bool) -> torch.Tensor:
        import torch

        if value not in self._flags:
            self._flags[value] = torch.tensor(value, dtype=torch.bool, device="cpu" if self.host_flags else self.device)
        return self._flags[value]

    def mean_halves(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        return (x[:half] + x[half:]) / 2

    def guide(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        uncond, text = x[:half], x[half:]
        return uncond + scale.to(x.dtype) * (text - uncond)


class ViewEngine(TrtEngine):
    """The gated engine for one view: its own context on ``profile``; outputs it does not ``keep`` go to
    ``scratch``."""

    def __init__(
        self,
        name: str,
        spec: mf.GraphSpec,
        engine: trt.ICudaEngine,
        shared: SharedActivations,
        stream: torch.cuda.Stream,
        profile: int,
        keep: set[str],
        scratch: Scratch,
    ) -> None:
        self.keep, self.scratch = keep, scratch
        super().__init__(name, spec, engine, shared, stream, cuda_graph=False)
        if profile and not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise RuntimeError(f"{name}: TensorRT refused optimization profile {profile} of the gated UNet")

    def _output_buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.keep:
            return super()._output_buffer(name, shape)
        return self.scratch.get(name, shape, self.dtypes[name])


class GatedView:
    """One UNet variant behind the runtime's ``Engine`` protocol, served by the gated engine."""

    def __init__(
        self,
        variant: GraphVariant,
        spec: mf.GraphSpec,
        gated: GatedSpec,
        family: mf.ModelFamily,
        inner: ViewEngine,
        ops: TorchOps,
    ) -> None:
        self.name, self.spec, self.variant, self.gated, self.family = variant.key, spec, variant, gated, family
        self.inner, self.ops = inner, ops
        self.dtypes = {t.name: t.dtype for t in spec.inputs}
        self.calls, self.seconds = 0, 0.0

    def asarray(self, array: np.ndarray, name: str | None = None) -> torch.Tensor:
        import torch

        dtype = getattr(torch, self.dtypes[name]) if name in self.dtypes else None
        with torch.cuda.stream(self.inner.stream):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.inner.shared.device, dtype)

    def numpy(self, value: Any) -> np.ndarray:
        return self.inner.numpy(value)

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        tensors = {n: self.asarray(v, n) if isinstance(v, np.ndarray) else v for n, v in feeds.items()}
        missing = [t.name for t in self.spec.inputs if t.name not in tensors]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        with torch.cuda.stream(self.inner.stream):
            outputs = self.inner(gated_feeds(self.gated, self.family, self.variant, tensors, self.ops))
            result = variant_outputs(self.gated, self.variant, outputs, tensors, self.ops)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return result


def gated_views(
    manifest: mf.Manifest,
    plan: Mapping[str, Any],
    engine: trt.ICudaEngine,
    shared: SharedActivations,
    stream: torch.cuda.Stream,
) -> dict[str, GatedView]:
    """A view per UNet variant of the manifest, all on ``engine`` (the deserialized ``unet_gated`` plan)."""
    import tensorrt as trt

    gated = GatedSpec.from_dict(plan["gated"])
    cfgs = [bool(p["cfg"]) for p in plan["profiles"]]
    if engine.num_optimization_profiles != len(cfgs):
        raise mf.ManifestError(
            f"the gated UNet plan has {engine.num_optimization_profiles} optimization profiles, its record "
            f"{len(cfgs)}: rebuild with tgate-build --gated-unet"
        )
    host = any(engine.get_tensor_location(selector(k)) == trt.TensorLocation.HOST for k in gated.sites)
    scratch, ops = Scratch(shared.device), TorchOps(shared.device, host)
    views: dict[str, GatedView] = {}
    for key, data in manifest.variants.items():
        variant = GraphVariant.from_dict(key, data)
        spec = manifest.graphs[key]
        profile = cfgs.index(variant.cfg)
        inner = ViewEngine(key, spec, engine, shared, stream, profile, kept_outputs(gated, variant), scratch)
        views[key] = GatedView(variant, spec, gated, manifest.model, inner, ops)
    return views
