"""Multiply-accumulate counts per graph variant, summed over a T-GATE step plan (V1 or V2).

Two sources count the same operations. An export's ONNX graphs: what a runtime executes (Conv, Gemm and
weight MatMuls, and the activation x activation MatMuls of attention), with shapes from ONNX shape inference
at one concrete batch and image size. Or, with ``--model``, the PyTorch modules the graphs are exported from
(:class:`VariantUNet`, the text encoders, the VAE decoder), built from the architecture's configs on the
``meta`` device and run under torch's ``FlopCounterMode``: no weights, no export, a second for any preset.
``tests/test_macs.py`` holds the two equal, graph by graph, on the tiny V1 and V2 exports.

A run's count follows the plan (:mod:`methods.plan`): each step runs the variant that serves it
(:func:`methods.variants.select`), so V1 (``sp = fi = 1, warm_up = 0``) and V2 parameters are counted the
same way; the baseline is the plain CFG run (every step computes every attention).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf
from ..contract import limits
from ..contract.args import SamplingArgs, ScheduleArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..contract.files import atomic_write_json, check_output_file
from ..methods.plan import Step, TGateParams, family_plan
from ..methods.variants import SCHEDULES, GraphVariant, select, variants_for

if TYPE_CHECKING:
    import onnx

V2_DEFAULTS = TGateParams.v2()  # the authors' defaults, for --model (an export has its own)


@dataclass
class GraphMacs:
    conv: int = 0
    linear: int = 0  # MatMul / Gemm with a weight operand
    attention: int = 0  # MatMul of two activations (QK^T, attn x V)

    @property
    def total(self) -> int:
        return self.conv + self.linear + self.attention

    @property
    def without_attention(self) -> int:
        """Conv and linear only: calflops' accounting (it doesn't see ``scaled_dot_product_attention``)."""
        return self.conv + self.linear


# --- counting ONNX graphs ---------------------------------------------------------------------------------
def _dims(manifest: mf.Manifest, key: str, batch: int, lat_h: int, lat_w: int) -> dict[str, int]:
    """Concrete values of every symbolic input dimension of one graph."""
    dims = {
        mf.BATCH: batch,
        mf.CFG_BATCH: 2 * batch if manifest.model.cfg else batch,  # a CFG graph's self-attention caches
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


# --- counting PyTorch modules on the meta device ------------------------------------------------------------
def count_module(fn: Any) -> GraphMacs:
    """MACs of ``fn()`` (a forward on ``meta`` tensors) from torch's FlopCounterMode: convolutions, weight
    matmuls (``mm``/``addmm``) and activation x activation matmuls (``bmm``, SDPA). 1 MAC = 2 FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    macs = GraphMacs()
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        if "convolution" in name:
            macs.conv += flops // 2
        elif name in ("aten.mm", "aten.addmm"):
            macs.linear += flops // 2
        elif "bmm" in name or "attention" in name:
            macs.attention += flops // 2
        else:
            raise RuntimeError(f"FlopCounterMode counted {name}, which this counter doesn't classify")
    return macs


@dataclass
class Architecture:
    """A model's modules with no weights (``meta``), as a stand-in for the pipeline the exporter reads."""

    name: str
    pipe: Any  # namespace: unet, vae, text_encoder(_2), scheduler, tokenizer.model_max_length, vae_scale_factor
    family: mf.ModelFamily

    @property
    def native(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)


def _configs(model: str) -> dict[str, Any]:
    """Configs of ``unet``, ``vae``, ``text_encoder``(``_2``) and ``scheduler``: a preset's, or a diffusers folder's."""
    from ..families import ARCHITECTURES, PRESETS

    if model in ARCHITECTURES:
        arch = ARCHITECTURES[model]
        scheduler = arch["scheduler"] if "_class_name" in arch["scheduler"] else {}
        return {**arch, "scheduler": scheduler, "max_length": 77}
    folder = Path(model).expanduser()
    if not folder.is_dir():
        known = ", ".join(sorted(set(ARCHITECTURES) | set(PRESETS)))
        raise UsageError(
            f"--model {model}: counting needs an architecture, a preset ({known}) or a diffusers folder; "
            "or pass an export folder"
        )
    out: dict[str, Any] = {}
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json"),
                       ("tokenizer", "tokenizer_config.json")):  # fmt: skip
        path = folder / part / name
        if path.is_file():
            out[part] = json.loads(path.read_text())
        elif part in ("unet", "vae", "text_encoder"):
            raise UsageError(f"--model {model} is not a diffusers folder: no {part}/{name}")
    out["max_length"] = int(out.pop("tokenizer", {}).get("model_max_length", 77))
    out.setdefault("scheduler", {})
    return out


def build_architecture(model: str) -> Architecture:
    """Every module of ``model`` on the ``meta`` device: shapes without weights (nothing is downloaded)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..families import detect_family, make_scheduler

    cfg = _configs(model)

    def text(config: dict[str, Any], cls: Any) -> Any:
        keep = {k: v for k, v in config.items() if k not in ("pad_token", "_class_name", "architectures")}
        return cls(CLIPTextConfig(**{"vocab_size": 49408, "max_position_embeddings": cfg["max_length"], **keep}))

    def drop(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    with torch.device("meta"):
        unet = UNet2DConditionModel(**drop(cfg["unet"])).eval()
        vae = AutoencoderKL(**drop(cfg["vae"])).eval()
        encoder = text(cfg["text_encoder"], CLIPTextModel).eval()
        encoder_2 = text(cfg["text_encoder_2"], CLIPTextModelWithProjection).eval() if "text_encoder_2" in cfg else None
    sched = cfg["scheduler"]
    scheduler = make_scheduler(sched) if "_class_name" in sched else DDIMScheduler.from_config(sched)
    pipe = SimpleNamespace(
        unet=unet,
        vae=vae,
        text_encoder=encoder,
        text_encoder_2=encoder_2,
        scheduler=scheduler,
        tokenizer=SimpleNamespace(model_max_length=cfg["max_length"]),
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )
    return Architecture(model, pipe, detect_family(pipe))


def architecture_graph_macs(
    arch: Architecture, variants: Sequence[GraphVariant], batch: int, height: int, width: int
) -> dict[str, GraphMacs]:
    """MACs per call of every graph the export would hold: the text encoder(s), each UNet variant (its
    replayed caches captured by its source variant, as the exporter makes its examples), the VAE decoder."""
    import torch

    from ..export.graphs import ExportOptions, unet_example, variant_feeds
    from ..export.tgate import VariantUNet, remove_tgate

    pipe, family = arch.pipe, arch.family
    example = {
        k: v.to("meta")
        for k, v in unet_example(pipe, ExportOptions(height=height, width=width), batch, family=family).items()
    }
    out: dict[str, GraphMacs] = {}
    encoders = [(mf.TEXT_ENCODER, pipe.text_encoder)]
    encoders += [(mf.TEXT_ENCODER_2, pipe.text_encoder_2)] if family.added_conditioning else []
    ids = torch.zeros(2 * batch if family.cfg else batch, pipe.tokenizer.model_max_length, dtype=torch.long)
    for key, encoder in encoders:
        out[key] = count_module(lambda e=encoder: e(ids.to("meta"), output_hidden_states=True))
    modules = {v.key: VariantUNet(pipe.unet, v, family) for v in variants}
    try:
        with torch.device("meta"):  # what the feeds make (the timestep) is meta too
            for v in variants:
                feeds = variant_feeds(modules, v, example)
                out[v.key] = count_module(lambda m=modules[v.key], f=feeds: m(**f))
    finally:
        remove_tgate(pipe.unet)
    latents = example[mf.SAMPLE]
    out[mf.VAE_DECODER] = count_module(lambda: pipe.vae.decode(latents, return_dict=False))
    return out


# --- a run: the plan's calls, totals, the baseline --------------------------------------------------------
@dataclass
class RunMacs:
    steps: int
    gate_step: int
    batch: int
    height: int
    width: int
    per_call: dict[str, GraphMacs] = field(default_factory=dict)
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 0
    variants: tuple[GraphVariant, ...] = ()  # the graph set counted (default: V1's, with CFG)
    model: mf.ModelFamily = field(default_factory=mf.ModelFamily)
    source: str = ""  # what was counted: "onnx: <export>" or "torch meta: <model>"

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants) or variants_for("v1", self.model.cfg)

    @property
    def params(self) -> TGateParams:
        return TGateParams(self.gate_step, self.sp_interval, self.fi_interval, self.warm_up)

    @property
    def schedule(self) -> str:
        """The graph set counted: ``v1`` (pre/post-gate) or ``v2`` (self-attention variants too)."""
        return "v1" if {v.key for v in self.variants} == {mf.PREGATE, mf.POSTGATE} else "v2"

    def _params(self, gate: int | TGateParams | None) -> TGateParams:
        if isinstance(gate, TGateParams):
            return gate
        return self.params if gate is None else TGateParams(gate, self.sp_interval, self.fi_interval, self.warm_up)

    def plan(self, gate: int | TGateParams | None = None) -> list[Step]:
        """The step plan (first-order schedulers: DDIM, Euler, DPM++ multistep, LCM)."""
        return family_plan(self.steps, self._params(gate), self.model)

    def unet_keys(self, gate: int | TGateParams | None = None) -> list[str]:
        """The UNet variant each step runs."""
        return [select(self.variants, step).key for step in self.plan(gate)]

    def baseline_keys(self) -> list[str]:
        """The plain run: every step the CFG graph, every attention computed."""
        return [select(self.variants, Step(i, self.model.cfg)).key for i in range(self.steps)]

    def _calls(self, unet: list[str]) -> dict[str, int]:
        calls = {k: 1 for k in (mf.TEXT_ENCODER, mf.TEXT_ENCODER_2) if k in self.per_call}
        calls.update({v.key: 0 for v in self.variants})
        for key in unet:
            calls[key] += 1
        calls[mf.VAE_DECODER] = 1
        return calls

    def calls(self, gate: int | TGateParams | None = None) -> dict[str, int]:
        """Calls per graph in one run of the plan (``gate``: another gate step, or other parameters)."""
        return self._calls(self.unet_keys(gate))

    def baseline_calls(self) -> dict[str, int]:
        return self._calls(self.baseline_keys())

    def _sum(self, calls: dict[str, int], graphs: tuple[str, ...] | None, attention: bool = True) -> int:
        graphs = graphs or tuple(self.per_call)  # every graph counted (SDXL: both text encoders)
        macs = self.per_call
        return sum((macs[k].total if attention else macs[k].without_attention) * n
                   for k, n in calls.items() if k in graphs and n)  # fmt: skip

    @property
    def unet_graphs(self) -> tuple[str, ...]:
        return tuple(v.key for v in self.variants)

    def total(self, gate: int | TGateParams | None = None, graphs: tuple[str, ...] | None = None) -> int:
        return self._sum(self.calls(gate), graphs)

    def baseline(self, graphs: tuple[str, ...] | None = None, attention: bool = True) -> int:
        return self._sum(self.baseline_calls(), graphs, attention)

    def split(self) -> tuple[list[int], list[int]]:
        """UNet MACs of each step that computes cross-attention (pre-gate) and of each that replays it."""
        pre, post = [], []
        for key in self.unet_keys():
            v = next(x for x in self.variants if x.key == key)
            (pre if v.reads_text else post).append(self.per_call[key].total)
        return pre, post

    @property
    def ratio(self) -> float:
        """r: MACs of a post-gate step over a pre-gate step, each averaged over the plan's steps (V1: the
        post-gate graph over the pre-gate graph); the graphs' ratio when the plan has no post-gate step."""
        pre, post = self.split()
        if pre and post:
            return (sum(post) / len(post)) / (sum(pre) / len(pre))
        cfg = select(self.variants, Step(0, self.model.cfg)).key
        gated = select(self.variants, Step(0, False, frozenset({"attn2"}))).key
        return self.per_call[gated].total / self.per_call[cfg].total

    @property
    def bound(self) -> float:
        """UNet speed-up bound (baseline MACs over the plan's) if time were proportional to MACs; V1: ``N / (g +
        (N - g) r)``."""
        unet = self.unet_graphs
        return self.baseline(unet) / self.total(None, unet)

    def to_dict(self) -> dict[str, object]:
        unet = self.unet_graphs
        plain = {k: v for k, v in asdict(self).items() if k not in ("per_call", "variants", "model")}
        return {
            **plain,
            "schedule": self.schedule,
            "family": self.model.family,
            "per_call": {k: {**asdict(v), "total": v.total} for k, v in self.per_call.items()},
            "calls": self.calls(),
            "plan": self.unet_keys(),
            "run_total": {"tgate": self.total(), "baseline": self.baseline()},
            "unet_total": {"tgate": self.total(None, unet), "baseline": self.baseline(unet)},
            "unet_total_without_attention_scores": {
                "tgate": self._sum(self.calls(), unet, attention=False),
                "baseline": self.baseline(unet, attention=False),
            },
            "ratio_post_over_pre": self.ratio,
            "speedup_bound": self.bound,
        }


# --- requests ---------------------------------------------------------------------------------------------
SAMPLING = SamplingArgs(steps=25, gate=10)
SCHEDULE = ScheduleArgs(
    unset="the export's, else the authors' V2 default",
    context="with --schedule v2, which any of these implies with --model",
)
SIZE = SizeArgs(unset="the export's, or the model's native")


def resolve_params(
    gate_step: int,
    schedule: str | None,
    sp_interval: int | None,
    fi_interval: int | None,
    warm_up: int | None,
    default_schedule: str = "v1",
    v2_defaults: dict[str, Any] | None = None,
) -> TGateParams:
    """The run's T-GATE parameters. ``schedule`` v1 is ``sp = fi = 1, warm_up = 0``; v2 takes each interval
    given, else ``v2_defaults`` (a V2 export's own; default: the authors' 5 / 1 / 2). No schedule: v2 if an
    interval is given, else ``default_schedule`` (an export's)."""
    given = {"sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up}
    if schedule is not None and schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    schedule = schedule or ("v2" if any(v is not None for v in given.values()) else default_schedule)
    if schedule == "v1":
        v1 = asdict(TGateParams.v1(gate_step))
        bad = [k for k, v in given.items() if v is not None and v != v1[k]]
        if bad:
            raise UsageError(f"--{bad[0].replace('_', '-')} is a V2 parameter: use it with --schedule v2")
        return TGateParams.v1(gate_step)
    base = {k: (v2_defaults or asdict(V2_DEFAULTS))[k] for k in given}
    return TGateParams(gate_step, **{k: base[k] if v is None else v for k, v in given.items()})


def _check_numbers(steps: int, gate_step: int, batch: int, sizes: Sequence[int | None]) -> None:
    """The CLI's checks, for the API's arguments too: one message per bad value, wherever it comes from."""
    parse(argparse.Namespace(steps=steps, gate=gate_step), SAMPLING)
    limits.check_int("--batch", batch, 1, limits.MAX_BATCH)
    parse(argparse.Namespace(**dict(zip(("height", "width", "max_pixels"), sizes, strict=True))), SIZE)


def _check_params(params_in: dict[str, int | None]) -> None:
    parse(argparse.Namespace(**params_in), SCHEDULE)


def _serve(run: RunMacs, where: str) -> None:
    """Every step of the plan has a graph to run, or a UsageError saying how to get one."""
    try:
        for step in run.plan():
            select(run.variants, step)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def check_request(
    root: Path,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    schedule: str | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
) -> RunMacs:
    """Every check before a graph is read: the numbers, then the manifest, the image size it takes and
    whether its graph variants serve the plan. Returns the (empty) run with the export's size filled in."""
    _check_numbers(steps, gate_step, batch, (height, width, max_pixels))
    _check_params({"sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up})
    manifest = mf.Manifest.load(root, verify=False)
    height = manifest.defaults["height"] if height is None else height
    width = manifest.defaults["width"] if width is None else width
    manifest.latent_size(height, width, max_pixels)
    v2 = manifest.defaults if manifest.schedule == "v2" else None
    params = resolve_params(gate_step, schedule, sp_interval, fi_interval, warm_up, manifest.schedule, v2)
    variants = tuple(GraphVariant.from_dict(k, v) for k, v in manifest.variants.items())
    run = RunMacs(steps, gate_step, batch, height, width, {}, params.sp_interval, params.fi_interval,
                  params.warm_up, variants, manifest.model, f"onnx: {root}")  # fmt: skip
    _serve(run, f"{root} is a {manifest.schedule} export")
    return run


def pipeline_macs(
    root: Path,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    schedule: str | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
    graphs: Sequence[str] | None = None,
) -> RunMacs:
    """MACs per graph call read off an export's ONNX graphs at one batch and image size (default: the
    export's), and per run of the plan (default parameters: the export's). ``graphs``: count only these
    (e.g. the UNet variants); totals then cover only them."""
    run = check_request(root, steps, gate_step, batch, height, width, max_pixels, schedule, sp_interval,
                        fi_interval, warm_up)  # fmt: skip
    manifest = mf.Manifest.load(root, verify=False)
    lat_h, lat_w = manifest.latent_size(run.height, run.width, max_pixels)
    for key, spec in manifest.graphs.items():
        if graphs is not None and key not in graphs:
            continue
        run.per_call[key] = count_graph(root / spec.file, _dims(manifest, key, batch, lat_h, lat_w))
    return run


def check_model_request(
    model: str,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    schedule: str | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
) -> tuple[RunMacs, Architecture]:
    """The numbers, the architecture (configs only, weights on ``meta``) and the image size it takes."""
    _check_numbers(steps, gate_step, batch, (height, width, None))
    _check_params({"sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up})
    arch = build_architecture(model)
    height = arch.native[0] if height is None else height
    width = arch.native[1] if width is None else width
    if height % arch.multiple or width % arch.multiple:
        raise UsageError(f"--height and --width must be multiples of {arch.multiple} for {model}, got {height}x{width}")
    v2 = None if arch.family.cfg else asdict(TGateParams.v1(1))  # guidance-free: the authors' LCM mode, 1 / 1 / 0
    params = resolve_params(gate_step, schedule, sp_interval, fi_interval, warm_up, "v1", v2)
    given = schedule or ("v2" if any(v is not None for v in (sp_interval, fi_interval, warm_up)) else "v1")
    variants = variants_for(given, arch.family.cfg)
    run = RunMacs(steps, gate_step, batch, height, width, {}, params.sp_interval, params.fi_interval,
                  params.warm_up, variants, arch.family, f"torch meta: {model}")  # fmt: skip
    _serve(run, f"--model {model}")
    return run, arch


def model_macs(
    model: str,
    steps: int = 25,
    gate_step: int = 10,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    schedule: str | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
) -> RunMacs:
    """MACs of a model's graphs counted off its PyTorch modules on the ``meta`` device (no weights, no
    export), at one batch and image size (default: the model's native), and per run of the plan. No
    schedule and no interval: V1; ``--schedule v2`` alone: the authors' V2 defaults."""
    run, arch = check_model_request(model, steps, gate_step, batch, height, width, schedule, sp_interval,
                                    fi_interval, warm_up)  # fmt: skip
    run.per_call = architecture_graph_macs(arch, run.variants, batch, run.height, run.width)
    return run


# --- the report -------------------------------------------------------------------------------------------
def _unit(value: int) -> tuple[float, str]:
    """The unit a report prints in: T(era) MACs for real models, G or M for the tiny ones."""
    return next((scale, name) for scale, name in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if value >= scale or name == "M")


def format_report(run: RunMacs) -> str:
    p, unet, calls = run.params, run.unet_graphs, run.calls()
    u, name = _unit(run.baseline())
    lines = [
        f"MACs at {run.width}x{run.height}, batch {run.batch}, {run.steps} steps, gate {run.gate_step}, "
        f"sp_interval {p.sp_interval}, fi_interval {p.fi_interval}, warm_up {p.warm_up} "
        f"({run.schedule} graphs; {run.source})",
        "",
        f"{'graph':<16} " + " ".join(f"{c + ' ' + name:>9}" for c in ("conv", "linear", "attn", "total")) + "  calls",
    ]
    for key, m in run.per_call.items():
        lines.append(
            f"{key:<16} {m.conv / u:>9.4f} {m.linear / u:>9.4f} {m.attention / u:>9.4f} {m.total / u:>9.4f} "
            f"{calls.get(key, 0):>6}"
        )
    plain = run._sum(calls, unet, attention=False)
    lines += [
        "",
        f"UNet per run:     baseline {run.baseline(unet) / u:.3f} {name} -> T-GATE "
        f"{run.total(None, unet) / u:.3f} {name}",
        f"pipeline per run: baseline {run.baseline() / u:.3f} {name} -> T-GATE {run.total() / u:.3f} {name}",
        f"UNet without attention-score MatMuls (calflops' accounting): baseline "
        f"{run.baseline(unet, attention=False) / u:.3f} {name} -> T-GATE {plain / u:.3f} {name}",
        f"r = post/pre-gate step = {run.ratio:.4f};  UNet speed-up bound (baseline / plan MACs) = {run.bound:.3f}x",
    ]
    return "\n".join(lines)


def build_parser() -> Parser:
    ap = Parser(
        prog="tgate-macs",
        description="Count MACs per graph variant and per run of a T-GATE plan (V1 or V2), off an export's "
        "graphs or, with --model, off the architecture's PyTorch modules (no weights).",
    )
    ap.add_argument("export_dir", type=Path, nargs="?", help="folder written by tgate-export")
    ap.add_argument(
        "--model", help="count a preset's (or a diffusers folder's) architecture instead of an export: no weights"
    )
    ap.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="v1: attn2 cached; v2: attn1 on a schedule too (default: the export's; --model: v1 unless an "
        "interval is given)",
    )
    ap.add_argument("--batch", type=int, default=1, help=f"prompts per call, 1..{limits.MAX_BATCH}")
    ap.add_argument("--json", type=Path, metavar="FILE.json", help="write the counts here")
    for group in (SAMPLING, SCHEDULE, SIZE):
        group.add_to(ap)
    return ap


@command("tgate-macs")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.export_dir is None) == (args.model is None):
        raise UsageError("name an export folder or --model (an architecture to count without weights), not both")
    if args.json is not None:
        check_output_file(args.json, (".json",), "--json")
    plan = (args.schedule, args.sp_interval, args.fi_interval, args.warm_up)
    if args.model is not None:
        if args.max_pixels is not None:
            raise UsageError("--max-pixels caps an export's sizes; --model allocates nothing, so it has no cap")
        run = model_macs(args.model, args.steps, args.gate, args.batch, args.height, args.width, *plan)
    else:
        size = (args.height, args.width, args.max_pixels)
        check_request(args.export_dir, args.steps, args.gate, args.batch, *size, *plan)
        run = pipeline_macs(args.export_dir, args.steps, args.gate, args.batch, *size, *plan)
    print(format_report(run))
    if args.json:
        atomic_write_json(args.json, run.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
