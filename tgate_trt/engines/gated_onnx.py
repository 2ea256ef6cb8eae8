"""Make the gated UNet graph (:mod:`.gated`) from the base variant's ONNX: ONNX ``If`` per cache site.

The base variant (V1 ``unet_pregate``, V2 ``unet_gate``) computes every site and outputs each one's value.
From it, with the weights left where they are (initializers of the outer graph, each stored once, which
the ``If`` branches read from the outer scope):

1. The CFG wrapper goes: each ``Concat([negative, positive])`` becomes a batch-``N`` input (``unet.sample``,
   ``unet.encoder_hidden_states``, SDXL's ``unet.text_embeds``/``unet.time_ids``) and the UNet's raw output
   before the guidance combination becomes ``unet.out``; views do both outside (:func:`.gated.gated_feeds`).
2. Every site's attention output (after ``to_out``, before the residual add: the tensor the capture reads,
   before its CFG mean) becomes the output ``<site>.out``.
3. The nodes that only that tensor needs (the block's norm, q/k/v, attention, ``to_out``) move into the
   else-branch of an ``If(replay.<kind>)`` whose then-branch is the cache input ``<site>``. Moving them is
   what makes a replayed site cost nothing: an ``If`` that selects between values computed outside it does
   not skip their computation (TensorRT evaluates a conditional lazily only for layers inside its
   branches), and ``If`` nodes that wrap only the selection would save weights but no time.

Both branches give ``[N, HW, C]`` of the same type, as TensorRT's conditional requires. The graph is checked
against :class:`.gated.GatedSpec` (every input it reads, nothing else); a base graph of another structure
raises :class:`GatedGraphError` naming what is missing, before any TensorRT work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..methods.plan import MEAN
from .gated import CFG_PAIRS, OUT, GatedSpec, selector, site_output

SLICES = ("Slice", "Split")
EXTERNAL_DATA = "model.onnx_data"
PROTOBUF_LIMIT = (1 << 31) - (1 << 20)


class GatedGraphError(mf.ManifestError):
    """The base graph does not have the structure the gated graph is made from (re-export, or build
    per-variant plans)."""


def _value_info(t: mf.TensorSpec) -> Any:
    import onnx

    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    return onnx.helper.make_tensor_value_info(t.name, elem, list(t.shape))


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def _producers(nodes: Iterable[Any]) -> dict[str, Any]:
    return {o: n for n in nodes for o in n.output if o}


def _closure(producers: dict[str, Any], roots: Iterable[str], stop: str | None = None) -> set[int]:
    """ids of the nodes ``roots`` depend on (not expanding past the tensor ``stop``)."""
    seen: set[int] = set()
    stack = [r for r in roots]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in seen or name == stop:
            continue
        seen.add(id(node))
        stack.extend(i for i in node.input if i)
    return seen


def _cfg_source(producers: dict[str, Any], noise: str, base: str) -> str:
    """The UNet's raw output: what the slices of the guidance combination read."""
    slices, seen, stack = [], set(), [noise]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in SLICES:
            slices.append(node)
        elif len(seen) < 64:  # the combination is a handful of nodes; never walk into the UNet
            stack.extend(node.input)
    sources = {s.input[0] for s in slices}
    if len(sources) != 1:
        raise GatedGraphError(
            f"{base}: {noise} is not the CFG combination of one tensor's halves ({len(sources)} found)"
        )
    return sources.pop()


def _mean_source(producers: dict[str, Any], name: str, base: str) -> str:
    """``x`` of a CFG-mean capture ``(x[:B] + x[B:]) / 2``."""
    div = producers.get(name)
    add = producers.get(div.input[0]) if div is not None and div.op_type == "Div" else None
    halves = [producers.get(i) for i in add.input] if add is not None and add.op_type == "Add" else []
    sources = {h.input[0] if h is not None and h.op_type in SLICES else None for h in halves}
    if len(halves) == 2 and len(sources) == 1 and None not in sources:
        return str(sources.pop())
    raise GatedGraphError(f"{base}: the capture {name} is not the CFG mean (x[:B] + x[B:]) / 2 of one tensor")


def _outer_names(graph: Any) -> set[str]:
    """Every name ``graph``'s nodes read, its subgraphs' outer-scope reads included."""
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                inner = _outer_names(attr.g)
                names |= inner - {o for n in attr.g.node for o in n.output}
    return names


def make_gated(model: Any, spec: GatedSpec) -> Any:
    """Turn ``model`` (the base variant's ``ModelProto``, modified in place) into the gated graph."""
    import onnx

    g, base = model.graph, spec.base
    wanted = {t.name for t in spec.inputs}
    for gated, (neg, pos) in CFG_PAIRS.items():
        if gated not in wanted:
            continue
        if spec.cfg:
            concat = next((n for n in g.node if n.op_type == "Concat" and list(n.input) == [neg, pos]), None)
            if concat is None:
                raise GatedGraphError(f"{base}: no Concat([{neg}, {pos}]) (its CFG batch) to make {gated} from")
            g.node.remove(concat)
            _rename(g, concat.output[0], gated)
        else:
            _rename(g, pos, gated)
    prods = _producers(g.node)
    _rename(g, _cfg_source(prods, mf.NOISE_PRED, base) if spec.cfg else mf.NOISE_PRED, OUT)
    for kind, names in spec.sites.items():
        for name in names:
            prods = _producers(g.node)
            _rename(g, _mean_source(prods, name, base) if spec.layouts[kind] == MEAN else name, site_output(name))
    del g.input[:], g.output[:], g.value_info[:]
    g.input.extend(_value_info(t) for t in spec.inputs)
    g.output.extend(_value_info(t) for t in spec.outputs)
    outputs = [t.name for t in spec.outputs]
    prods = _producers(g.node)
    missing = [o for o in outputs if o not in prods]
    if missing:
        raise GatedGraphError(f"{base}: nothing computes {', '.join(missing)}")
    live = _closure(prods, outputs)
    kept = [n for n in g.node if id(n) in live]
    # each site's exclusive cone: what its value needs that nothing else (outputs, other sites) does
    prods = _producers(kept)
    cones: dict[int, tuple[str, str, list[Any]]] = {}  # id(last node) -> (kind, site, cone nodes)
    order = {id(n): i for i, n in enumerate(kept)}
    for kind, names in spec.sites.items():
        for name in names:
            out = site_output(name)
            cone = _closure(prods, [out]) - _closure(prods, outputs, stop=out)
            nodes = sorted((n for n in kept if id(n) in cone), key=lambda n: order[id(n)])
            cones[id(prods[out])] = (kind, name, nodes)
    moved = {id(n) for _, _, ns in cones.values() for n in ns}
    types = {t.name: t for t in spec.outputs}
    body: list[Any] = []
    for node in kept:
        if id(node) in cones:
            kind, name, nodes = cones[id(node)]
            body.append(_gate(kind, name, nodes, types[site_output(name)]))
        elif id(node) not in moved:
            body.append(node)
    del g.node[:]
    g.node.extend(body)
    used = _outer_names(g)
    initializers = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(initializers)
    defined = wanted | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    unknown = sorted(used - defined)
    unused = sorted(wanted - used)
    if unknown or unused:
        raise GatedGraphError(
            f"{base}: the gated graph still reads {', '.join(unknown) or 'nothing unknown'} and does not read "
            f"{', '.join(unused) or 'every input'}: the base graph has another structure"
        )
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in g.initializer)
    if model.ByteSize() < PROTOBUF_LIMIT and not external:  # the others are checked by path once saved, or
        onnx.checker.check_model(model)  # by ONNX Runtime loading them beside their weights
    return model


def _gate(kind: str, name: str, nodes: list[Any], out: mf.TensorSpec) -> Any:
    """``If(replay.<kind>)``: the cache input ``name``, else the moved nodes computing the site's value."""
    import onnx

    computed, cached = f"{out.name}/computed", f"{out.name}/cached"
    inner = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, o in enumerate(copy.output):
            if o == out.name:
                copy.output[i] = computed
        inner.append(copy)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(out.dtype))
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [name], [cached], name=f"/gate/{name}/replay")],
        f"replay_{name}",
        [],
        [onnx.helper.make_tensor_value_info(cached, elem, None)],
    )
    else_branch = onnx.helper.make_graph(
        inner, f"compute_{name}", [], [onnx.helper.make_tensor_value_info(computed, elem, None)]
    )
    return onnx.helper.make_node(
        "If", [selector(kind)], [out.name], name=f"/gate/{name}", then_branch=then_branch, else_branch=else_branch
    )


def gated_file(src: Path, dst: Path, spec: GatedSpec) -> Path:
    """Write the gated graph of ``src`` (the base variant's ONNX, any external data next to it) as ``dst``,
    its weights in one external-data file beside it; returns ``dst``."""
    import onnx

    model = make_gated(onnx.load(str(src), load_external_data=True), spec)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)
    onnx.checker.check_model(str(dst))
    return dst


def count_ifs(model: Any) -> dict[str, int]:
    """``{kind: number of If nodes on its selector}``: for tests and the build log."""
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type == "If":
            counts[node.input[0].removeprefix("replay.")] += 1
    return dict(counts)
