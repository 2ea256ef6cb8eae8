"""Multiply-accumulate counts read off the exported graphs, per graph and per pipeline run.

Counting the ONNX graphs themselves (not the PyTorch modules) means the number describes exactly what a
runtime executes: Conv, Gemm, weight MatMuls and the activation x activation MatMuls of attention, with
shapes from ONNX shape inference (with data propagation) at one concrete batch and image size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import manifest as mf
from ..contract import limits
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..contract.files import atomic_write_json, check_output_file

if TYPE_CHECKING:
    import onnx


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
    import onnx
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    keep = []
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) > small:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            continue
        if uses_external_data(init):
            load_external_data_for_tensor(init, base_dir)
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
        keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def count_graph(path: Path, dims: dict[str, int]) -> GraphMacs:
    import onnx
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


def check_request(
    root: Path,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
) -> RunMacs:
    """Every check before a graph is read: the numbers, then the manifest and the image size it takes.
    Returns the (empty) run with the export's default size filled in."""
    limits.check_steps(steps, name="--steps")
    limits.check_int("--gate", gate_step, 1, None, ": the cache comes from a step before the gate")
    limits.check_int("--batch", batch, 1, limits.MAX_BATCH)
    for name, value in (("--height", height), ("--width", width), ("--max-pixels", max_pixels)):
        if value is not None:
            limits.check_int(name, value, 1)
    manifest = mf.Manifest.load(root, verify=False)
    height = manifest.defaults["height"] if height is None else height
    width = manifest.defaults["width"] if width is None else width
    manifest.latent_size(height, width, max_pixels)
    return RunMacs(steps, gate_step, batch, height, width)


def pipeline_macs(
    root: Path,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
) -> RunMacs:
    """MACs per graph call at one batch and image size (default: the export's), and per run."""
    run = check_request(root, steps, gate_step, batch, height, width, max_pixels)
    manifest = mf.Manifest.load(root, verify=False)
    lat_h, lat_w = manifest.latent_size(run.height, run.width, max_pixels)
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
        f"pipeline per run: baseline {run.total(run.steps) / t:.3f} T -> T-GATE {run.total(run.gate_step) / t:.3f} T",
        f"r = post/pre = {run.ratio:.4f};  UNet speed-up bound N/(g+(N-g)r) = {run.bound:.3f}x",
    ]
    return "\n".join(lines)


def build_parser() -> Parser:
    ap = Parser(prog="tgate-macs", description="Count MACs of an export's graphs per run.")
    ap.add_argument("export_dir", type=Path, help="folder written by tgate-export")
    ap.add_argument("--steps", type=int, default=25, help=f"denoising steps, 1..{limits.MAX_STEPS}")
    ap.add_argument("--gate", type=int, default=10, help="gate step (>= --steps: no gating)")
    ap.add_argument("--batch", type=int, default=1, help=f"prompts per call, 1..{limits.MAX_BATCH}")
    ap.add_argument("--height", type=int, help="image height (default: the export's)")
    ap.add_argument("--width", type=int, help="image width (default: the export's)")
    ap.add_argument("--max-pixels", type=int, help="cap on height*width (default: the export's, 4x its native size)")
    ap.add_argument("--json", type=Path, metavar="FILE.json", help="write the counts here")
    return ap


@command("tgate-macs")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_output_file(args.json, (".json",), "--json")
    size = (args.height, args.width, args.max_pixels)
    check_request(args.export_dir, args.steps, args.gate, args.batch, *size)
    run = pipeline_macs(args.export_dir, args.steps, args.gate, args.batch, *size)
    print(format_report(run))
    if args.json:
        atomic_write_json(args.json, run.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
