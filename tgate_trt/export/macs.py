"""Multiply-accumulate counts read off the exported graphs, per graph and per pipeline run.

Counting the ONNX graphs themselves (not the PyTorch modules) means the number describes exactly what a
runtime executes: Conv, Gemm, weight MatMuls and the activation x activation MatMuls of attention, with
shapes from ONNX shape inference (with data propagation) at one concrete batch and image size.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .. import manifest as mf
from ..contract.errors import UsageError


@dataclass
class GraphMacs:
    conv: int = 0
    linear: int = 0  # MatMul / Gemm with a weight operand
    attention: int = 0  # MatMul of two activations (QK^T, attn x V)

    @property
    def total(self) -> int:
        return self.conv + self.linear + self.attention


def _dims(manifest: mf.Manifest, key: str, batch: int, lat_h: int, lat_w: int) -> dict[str, int]:
    """Concrete values of every symbolic input dimension of one graph."""
    dims = {
        mf.BATCH: batch,
        mf.LATENT_H: lat_h,
        mf.LATENT_W: lat_w,
        "latent_height": lat_h,
        "latent_width": lat_w,
    }
    # prompts + negatives with CFG, prompts alone for guidance-free families
    dims["batch_size"] = manifest.encoder_batch(batch) if key in (mf.TEXT_ENCODER, mf.TEXT_ENCODER_2) else batch
    dims["sequence_length"] = manifest.text["max_length"]
    for layer in manifest.cache_layers:
        dims[mf.hw_dim(layer.level)] = layer.tokens(lat_h, lat_w)
    return dims


def _fix_inputs(model: onnx.ModelProto, dims: dict[str, int]) -> None:
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                if d.dim_param not in dims:
                    raise UsageError(f"no value for dimension {d.dim_param!r} of input {value.name}")
                d.dim_value = dims[d.dim_param]
    for value in model.graph.output:  # let inference derive outputs (some carry expressions)
        value.type.tensor_type.ClearField("shape")


def _weights_as_inputs(model: onnx.ModelProto, base_dir: str, small: int = 4096) -> None:
    """Turn large weights into graph inputs of the same shape: shape inference then never reads
    them, while small constants (which may feed shape arithmetic) keep their values."""
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    keep = []
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) > small:
            model.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
            continue
        if uses_external_data(init):
            load_external_data_for_tensor(init, base_dir)
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
        keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def count_graph(path: Path, dims: dict[str, int]) -> GraphMacs:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)  # shapes only; weights stay on disk
    graph_inputs = [v.name for v in model.graph.input]
    _fix_inputs(model, dims)
    _weights_as_inputs(model, str(path.parent))
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    weights = set(shapes) | {v.name for v in model.graph.input} - set(graph_inputs)
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    macs = GraphMacs()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        out = shapes.get(node.output[0])
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not out or not a or not b or 0 in out or 0 in a or 0 in b:
            raise RuntimeError(f"{path}: shape of {node.op_type} {node.name} could not be inferred")
        if node.op_type == "Conv":  # every output element: C_in/groups * prod(kernel) MACs
            macs.conv += int(np.prod(out)) * int(np.prod(b[1:]))
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs.linear += int(np.prod(out)) * (a[0] if trans_a else a[-1])
        else:
            n = int(np.prod(out)) * a[-1]
            if node.input[0] in weights or node.input[1] in weights:
                macs.linear += n
            else:
                macs.attention += n
    return macs


@dataclass
class RunMacs:
    steps: int
    gate_step: int
    batch: int
    height: int
    width: int
    per_call: dict[str, GraphMacs] = field(default_factory=dict)

    def calls(self, gate: int) -> dict[str, int]:
        g = min(gate, self.steps)
        calls = {mf.TEXT_ENCODER: 1, mf.PREGATE: g, mf.POSTGATE: self.steps - g, mf.VAE_DECODER: 1}
        if mf.TEXT_ENCODER_2 in self.per_call:  # SDXL
            calls[mf.TEXT_ENCODER_2] = 1
        return calls

    def total(self, gate: int, graphs: tuple[str, ...] | None = None) -> int:
        graphs = graphs or tuple(self.per_call)  # every graph counted (SDXL: both text encoders)
        return sum(self.per_call[k].total * n for k, n in self.calls(gate).items() if k in graphs)

    @property
    def ratio(self) -> float:
        """r: post-gate / pre-gate MACs per step."""
        return self.per_call[mf.POSTGATE].total / self.per_call[mf.PREGATE].total

    @property
    def bound(self) -> float:
        """UNet speed-up bound ``N / (g + (N - g) r)`` if time were proportional to MACs."""
        n, g = self.steps, min(self.gate_step, self.steps)
        return n / (g + (n - g) * self.ratio)

    def to_dict(self) -> dict[str, object]:
        unet = (mf.PREGATE, mf.POSTGATE)
        return {
            **{k: v for k, v in asdict(self).items() if k != "per_call"},
            "per_call": {k: {**asdict(v), "total": v.total} for k, v in self.per_call.items()},
            "run_total": {"tgate": self.total(self.gate_step), "baseline": self.total(self.steps)},
            "unet_total": {
                "tgate": self.total(self.gate_step, unet),
                "baseline": self.total(self.steps, unet),
            },
            "ratio_post_over_pre": self.ratio,
            "speedup_bound": self.bound,
        }


def pipeline_macs(
    root: Path,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> RunMacs:
    manifest = mf.Manifest.load(root, verify=False)
    mf.check_gate(steps, gate_step)
    height = height or manifest.defaults["height"]
    width = width or manifest.defaults["width"]
    lat_h, lat_w = manifest.latent_size(height, width)
    run = RunMacs(steps, gate_step, batch, height, width)
    for key, spec in manifest.graphs.items():
        run.per_call[key] = count_graph(root / spec.file, _dims(manifest, key, batch, lat_h, lat_w))
    return run


def format_report(run: RunMacs) -> str:
    t = 1e12
    lines = [
        f"MACs at {run.width}x{run.height}, batch {run.batch}, {run.steps} steps, gate {run.gate_step}",
        "",
    ]
    lines.append(f"{'graph':<15} {'conv T':>9} {'linear T':>9} {'attn T':>9} {'total T':>9} {'calls':>6}")
    calls = run.calls(run.gate_step)
    for key, m in run.per_call.items():
        lines.append(
            f"{key:<15} {m.conv / t:>9.4f} {m.linear / t:>9.4f} {m.attention / t:>9.4f} {m.total / t:>9.4f} "
            f"{calls[key]:>6}"
        )
    unet = (mf.PREGATE, mf.POSTGATE)
    lines += [
        "",
        f"UNet per run:     baseline {run.total(run.steps, unet) / t:.3f} T"
        f" -> T-GATE {run.total(run.gate_step, unet) / t:.3f} T",
        f"pipeline per run: baseline {run.total(run.steps) / t:.3f} T"
        f" -> T-GATE {run.total(run.gate_step) / t:.3f} T",
        f"r = post/pre = {run.ratio:.4f};  UNet speed-up bound N/(g+(N-g)r) = {run.bound:.3f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tgate-macs", description="Count MACs of an export's graphs per run.")
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--gate", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args(argv)
    try:
        run = pipeline_macs(args.export_dir, args.steps, args.gate, args.batch, args.height, args.width)
    except (mf.ManifestError, ValueError) as exc:
        print(f"tgate-macs: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(run))
    if args.json:
        mf.atomic_write_text(args.json, json.dumps(run.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
