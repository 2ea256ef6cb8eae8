"""The UNet variants of one pipeline as one OpenVINO compiled model: their weights repacked once.

Why one compiled model: the CPU plugin repacks (and at bf16 converts) every weight into its own layout and
keeps the result in a weights cache that belongs to one compiled model (``CompiledModel::m_socketWeights``),
keyed by the source constant's address and the target layout. Two compiled models that read the same
memory-mapped weights still hold two repacked copies: measured on a 216 MB UNet, pre- plus post-gate graphs
compiled separately peak at 1.41x (f32) and 1.36x (bf16) the RSS of one. Inside one compiled model, ``If``
bodies share that cache (``If`` builds its bodies in the parent's graph context), so variants whose
constants view the same mapping (:func:`~tgate_trt.engines.openvino_shared.bind_weights`) repack each
weight once: 1.10x (f32) and 1.13x (bf16) of one graph, the rest being the second body's activation memory
(it grows with the image size).

The combined model takes every variant's inputs (one port per name and shape) plus ``tgate_variant``, and
holds one ``If`` per variant, taken when ``tgate_variant`` is its index; the other branch returns empty
tensors, so an idle variant computes, copies and holds nothing. Each variant's outputs are its own ports, and
each variant keeps its own infer request, so the tensors it returns stay its own between calls. It is compiled
without the compile cache: the CPU plugin's cached blob stores each body's constants separately (424 MB for a
216 MB UNet, measured) and an import gives each body its own copy, which undoes the sharing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf

SELECT = "tgate_variant"
COMBINE_MIN_BYTES = 64 << 20  # by default, variants referencing less of the shared weights compile alone


def resolve_dims(manifest: mf.Manifest, spec: mf.GraphSpec, feeds: Mapping[str, Any]) -> dict[str, int]:
    """Every symbolic dimension of the UNet graphs, from one call's inputs: what it binds, and what the
    export's cache layout derives from the latent size (``cfg_batch``, ``hw_x<level>``)."""
    dims: dict[str, int] = {}
    for tensor in spec.inputs:
        shape = tuple(feeds[tensor.name].shape) if tensor.name in feeds else ()
        for sym, size in zip(tensor.shape, shape, strict=False):
            if isinstance(sym, str):
                dims[sym] = int(size)
    sample = feeds[mf.SAMPLE].shape
    batch, lat_h, lat_w = int(sample[0]), int(sample[2]), int(sample[3])
    dims.setdefault(mf.BATCH, batch)
    dims.setdefault(mf.CFG_BATCH, 2 * batch)
    dims.setdefault(mf.LATENT_H, lat_h)
    dims.setdefault(mf.LATENT_W, lat_w)
    for layer in manifest.cache_layers:
        dims.setdefault(mf.hw_dim(layer.level), layer.tokens(lat_h, lat_w))
    return dims


def input_shapes(spec: mf.GraphSpec, dims: Mapping[str, int]) -> dict[str, list[int]]:
    """A graph's input shapes with ``dims`` filled in; a dimension nothing binds stays dynamic (-1)."""
    return {t.name: [d if isinstance(d, int) else dims.get(d, -1) for d in t.shape] for t in spec.inputs}


class Combined:
    """The combined model's ports: per variant, where each of its inputs and outputs is."""

    def __init__(self, model: Any, inputs: dict[str, dict[str, str]], outputs: dict[str, dict[str, str]]) -> None:
        self.model = model
        self.inputs = inputs  # variant -> its input name -> port name in the combined model
        self.outputs = outputs  # variant -> its output name -> port name


def combine(models: dict[str, Any]) -> Combined:
    """One model running ``models`` (variant key -> ov.Model, in manifest order): an ``If`` per variant,
    taken when ``SELECT`` is its index, whose other branch returns empty tensors (nothing to compute, copy or
    hold). Each variant's outputs are its own ports (``<key>/<name>``); inputs of one name and shape are one
    port, fed to every variant that reads it (a name with another shape gets ``.<key>``)."""
    import openvino as ov
    import openvino.opset8 as ops

    names: dict[tuple[str, str], str] = {}  # (input name, shape) -> port name
    params: dict[str, Any] = {}
    for key, model in models.items():
        for port in model.inputs:
            ident = (port.get_any_name(), str(port.get_partial_shape()))
            if ident not in names:
                names[ident] = f"{ident[0]}.{key}" if ident[0] in params else ident[0]
                params[names[ident]] = ov.op.Parameter(port.get_element_type(), port.get_partial_shape())
    select = ov.op.Parameter(ov.Type.i32, ov.PartialShape([]))
    inputs: dict[str, dict[str, str]] = {}
    outputs: dict[str, dict[str, str]] = {}
    results = []
    for index, (key, model) in enumerate(models.items()):
        inputs[key] = {p.get_any_name(): names[(p.get_any_name(), str(p.get_partial_shape()))] for p in model.inputs}
        node = ops.if_op(ops.equal(select, ops.constant(np.int32(index))).output(0))
        empty = [
            ov.op.Result(ov.op.Constant(p.get_element_type(), ov.Shape([0] * len(p.get_partial_shape())), []).output(0))
            for p in model.outputs
        ]
        node.set_then_body(model)
        node.set_else_body(ov.Model(empty, [], f"{key}_idle"))
        for param in model.get_parameters():
            node.set_input(params[inputs[key][param.output(0).get_any_name()]].output(0), param, None)
        outputs[key] = {}
        for port, then_result, else_result in zip(model.outputs, model.get_results(), empty, strict=True):
            value = node.set_output(then_result, else_result)
            outputs[key][port.get_any_name()] = name = f"{key}/{port.get_any_name()}"
            value.get_tensor().set_names({name})
            results.append(ov.op.Result(value))
    for name, param in {**params, SELECT: select}.items():
        param.set_friendly_name(name)
        param.output(0).get_tensor().set_names({name})
    model = ov.Model(results, [select, *params.values()], "tgate_variants")
    return Combined(model, inputs, outputs)


class VariantGroup:
    """The variants ``keys`` compiled as one model, for the shapes of the latest call (``static``) or for
    any (dynamic); engines ask :meth:`prepare` before each call."""

    def __init__(
        self,
        manifest: mf.Manifest,
        keys: list[str],
        core: Any,
        xmls: Mapping[str, Path],
        weights: np.ndarray | None,
        device: str,
        config: dict[str, str],
        static: bool,
    ) -> None:
        self.manifest, self.keys, self.core, self.xmls = manifest, keys, core, xmls
        self.weights, self.device, self.static = weights, device, static  # weights: kept mapped while compiled
        self.config = {**config, "CACHE_DIR": ""}  # see the module's docstring: a cached blob undoes the sharing
        self.compiled: Any = None
        self.combined: Combined | None = None
        self.members: list[Any] = []  # the variants' engines: they let go of an old compile before a new one
        self.epoch = 0  # counts compiles: an engine whose request is older makes a new one
        self._shapes: dict[str, dict[str, list[int]]] | None = None
        self._dummies: dict[str, dict[str, Any]] = {}  # variant -> zeros for the inputs it does not read
        self._zero = np.zeros(0, np.uint8)  # one read-only buffer that every such input views
        if not static:
            self._compile(None)

    def _compile(self, shapes: dict[str, dict[str, list[int]]] | None) -> None:
        import openvino as ov

        from ..engines.openvino_shared import pages_released, read_bound

        for engine in self.members:  # free the old compiled model (every request on it) before the new
            engine.release()
        self.compiled, self.combined = None, None
        models = {}
        for key in self.keys:
            model = read_bound(self.core, self.xmls[key], self.weights)
            if shapes is not None:
                model.reshape({n: ov.PartialShape(s) for n, s in shapes[key].items()})
            models[key] = model
        combined = combine(models)
        del models
        with pages_released(self.weights):
            self.compiled = self.core.compile_model(combined.model, self.device, self.config)
        combined.model = None  # the compiled model keeps what it needs
        self.combined = combined
        self.epoch += 1

    def prepare(self, key: str, feeds: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Compile for the shapes ``feeds`` implies for every variant, unless already; returns the compile's
        number and the zero tensors ``key``'s request feeds to the inputs only other variants read."""
        dims = resolve_dims(self.manifest, self.manifest.graphs[key], feeds)
        shapes = {k: input_shapes(self.manifest.graphs[k], dims) for k in self.keys}
        if shapes != self._shapes:
            if self.static or self.compiled is None:
                self._compile(shapes)
            self._shapes, self._dummies = shapes, {}
        if key not in self._dummies:
            self._dummies[key] = self._zeros(key, shapes)
        return self.epoch, self._dummies[key]

    def _zeros(self, key: str, shapes: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
        """Views of one zero buffer: a body that does not run never reads them, and nothing writes them."""
        import openvino as ov

        assert self.combined is not None
        own = set(self.combined.inputs[key].values())
        wanted: dict[str, tuple[list[int], Any]] = {}
        for other in self.keys:
            for name, port in self.combined.inputs[other].items():
                if port not in own and port not in wanted:
                    wanted[port] = (shapes[other][name], self.compiled.input(port).get_element_type())
        size = max((math.prod(s) * t.size for s, t in wanted.values()), default=0)
        if size > self._zero.size:
            self._zero = np.zeros(size, np.uint8)
        return {port: ov.Tensor(self._zero[: math.prod(s) * t.size], s, t) for port, (s, t) in wanted.items()}

    def ports(self, key: str) -> tuple[dict[str, str], dict[str, str]]:
        assert self.combined is not None
        return self.combined.inputs[key], self.combined.outputs[key]

    def selector(self, key: str) -> Any:
        import openvino as ov

        return ov.Tensor(np.array(self.keys.index(key), np.int32))
