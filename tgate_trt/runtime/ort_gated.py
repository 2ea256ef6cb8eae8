"""ONNX Runtime on the CPU: every UNet variant of a pipeline runs on one session, so its weights are held once.

Each variant graph carries the whole UNet's weights, and ORT gives every session its own copy of them:
graph optimisation rewrites weights per session (convolution weights reordered to the NCHWc layout) and
MLAS pre-packs each MatMul weight into a buffer of its own. Sessions that share one memory-mapped copy with
optimisation and pre-packing off save the memory but cost 2-5% per call (SD-1.5, 256², measured in
``benchmarks/README.md``). One session avoids the question: the gated graph (:mod:`tgate_trt.engines.gated`,
the one UNet with an ``If`` per cache site, built for TensorRT the same way) is made here from the base
variant's structure alone (no weight is read; a fraction of a second at SD-1.5 size), its initializers read
from the export's own ``unet/model.onnx_data``; ORT optimises and pre-packs each weight once, and every
variant is a view of that session (:class:`OrtView`): bit-identical outputs, the same speed per call.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..engines.gated import GatedSpec, NumpyOps, gated_feeds, gated_spec, output_recipe, variant_outputs
from ..methods.variants import GraphVariant
from .engine import session_options

_OPS = NumpyOps()


class GatedOrtUnet:
    """One ORT session over the gated UNet graph of an export."""

    def __init__(
        self, root: Path, manifest: mf.Manifest, providers: Sequence[str], threads: int = 0, cpu_arena: str = "shared"
    ) -> None:
        import onnx
        import onnxruntime as ort

        from ..engines.gated_onnx import make_gated

        self.spec: GatedSpec = gated_spec(manifest)
        src = root / manifest.graphs[self.spec.base].file
        model = make_gated(onnx.load(str(src), load_external_data=False), self.spec)
        opts = session_options(threads, cpu_arena)
        # the graph is loaded from memory; its external data stays where the export keeps it (and is checked)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
        self.family = manifest.model

    def run(self, variant: GraphVariant, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``variant``'s outputs for its own ``feeds``, from one call of the gated session."""
        inputs = gated_feeds(self.spec, self.family, variant, feeds, _OPS)
        wanted = sorted({source for _, source in output_recipe(self.spec, variant).values()})
        outputs = dict(zip(wanted, self.session.run(wanted, inputs), strict=True))
        return variant_outputs(self.spec, variant, outputs, feeds, _OPS)


class OrtView:
    """One UNet variant as an :class:`~tgate_trt.runtime.engine.Engine` over the shared gated session."""

    def __init__(self, unet: GatedOrtUnet, variant: GraphVariant, spec: mf.GraphSpec) -> None:
        self.unet, self.variant, self.spec, self.name = unet, variant, spec, variant.key
        self.dtypes = {t.name: np.dtype(t.dtype) for t in [*spec.inputs, *spec.outputs]}
        self.calls, self.seconds = 0, 0.0

    def asarray(self, array: np.ndarray, name: str | None = None) -> np.ndarray:
        return np.ascontiguousarray(array, self.dtypes[name] if name is not None else None)

    def numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = self.unet.run(self.variant, feeds)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return outputs


def gated_views(
    root: Path, manifest: mf.Manifest, providers: Sequence[str], threads: int = 0, cpu_arena: str = "shared"
) -> dict[str, OrtView] | None:
    """A view per UNet variant over one gated session, or None (with a warning) where the export's base graph
    does not have the structure the gated graph is made from: its variants then load one session each."""
    try:
        unet = GatedOrtUnet(root, manifest, providers, threads, cpu_arena)
    except mf.ManifestError as exc:
        warnings.warn(f"the UNet variants load their own weights each ({exc}); re-export to share them", stacklevel=2)
        return None
    return {
        key: OrtView(unet, GraphVariant.from_dict(key, value), manifest.graphs[key])
        for key, value in manifest.variants.items()
    }
