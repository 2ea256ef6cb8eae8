"""``tgate-analyze``: how fast does each ``attn2`` (or ``attn1``) output converge over the denoising steps?

T-GATE rests on the observation that cross-attention outputs stop changing after a few steps. This
runs the plain CFG pipeline (no gating) on the one sampler loop (:func:`methods.sampler.denoise`) through
a :class:`VariantUNet`, the module the graphs are exported from, declared to capture every output of the
kind as a gate would cache it (the CFG mean), and records per layer and step ``i >= 1`` the relative
change ``||a_i - a_{i-1}||_F / ||a_{i-1}||_F``, averaged over prompts. ``--kind attn1`` does the same for
self-attention, the outputs T-GATE V2 replays between ``sp_interval`` / ``fi_interval`` steps. The
suggested gate is the first step ``g`` from which the mean change stays below the threshold: the cache
of step ``g - 1`` then differs little from every later step's output.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract import limits
from ..contract.args import OutputArgs, SamplingArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..methods.plan import KINDS
from ..methods.variants import GraphVariant
from .bench_report import ReportFiles, json_safe, write_json

JSON_NAME, PNG_NAME = "convergence.json", "convergence.png"
MAX_SIDE = 16384  # pixels per side refused before a model is loaded; the model's own cap applies after


def suggest_gate(mean_curve: Sequence[float], threshold: float) -> int | None:
    """First step ``g >= 1`` with ``mean_curve[i - 1] < threshold`` for every step ``i >= g``.

    ``mean_curve[k]`` is the change at step ``k + 1``; ``None`` when the last step is still above.
    """
    gate = None
    for step in range(len(mean_curve), 0, -1):
        if not mean_curve[step - 1] < threshold:
            break
        gate = step
    return gate


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text (one prompt per line expected)") from None
    except OSError as exc:
        raise UsageError(f"prompt file {path} can't be read: {exc.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts (one per line expected)")
    return prompts


def convergence_curves(
    pipe: Any,
    prompts: list[str],
    steps: int,
    seed: int = 0,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    progress: Callable[[], None] | None = None,
    kind: str = "attn2",
) -> tuple[list[str], dict[str, list[float]], list[int]]:
    """Per-layer relative change curves of ``kind`` (length ``steps - 1``, mean over prompts) and the timesteps.

    Prompt ``j`` gets its own generator seeded ``seed + j``, so results don't depend on batching.
    """
    import torch

    with torch.no_grad():
        return _curves(pipe, prompts, steps, seed, guidance_scale, height, width, batch_size, progress, kind)


class _Recorder:
    """The sampler's runner for the analysis: runs the recording variant's module (the PyTorch graph that is
    exported) and, per call, adds each captured output's relative change since the previous call to ``sums``."""

    def __init__(self, module: Any, names: list[str], sums: dict[str, Any]) -> None:
        self.module, self.names, self.sums = module, names, sums
        self.prev: list[Any] = []
        self.calls = 0

    def __call__(self, variant: GraphVariant, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        noise, *caches = self.module(**feeds)
        flat = [c.float().flatten(1) for c in caches]
        if self.prev:
            for name, a, b in zip(self.names, flat, self.prev, strict=True):
                rel = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
                self.sums[name][self.calls - 1] += rel.double().sum().cpu()
        self.prev, self.calls = flat, self.calls + 1
        return {mf.NOISE_PRED: noise}  # the captures stay here: no later step replays them

    def sample(self, variant: GraphVariant, x: Any, t: Any) -> dict[str, Any]:
        import torch

        return {mf.SAMPLE: x, mf.TIMESTEP: t.reshape(1).to(torch.float32)}

    def noise(self, value: Any) -> Any:
        return value


def _curves(
    pipe: Any,
    prompts: list[str],
    steps: int,
    seed: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    batch_size: int,
    progress: Callable[[], None] | None,
    kind: str,
) -> tuple[list[str], dict[str, list[float]], list[int]]:
    """A plain (no gate) run on the one sampler loop, through a graph variant that computes every attention
    and outputs each ``kind`` output as the cache a gate would keep (CFG mean, or as-is without CFG)."""
    import torch

    from ..export.reference import encode_conditioning
    from ..export.tgate import VariantUNet, remove_tgate
    from ..families import detect_family
    from ..methods.plan import FULL, MEAN, Step
    from ..methods.sampler import denoise

    family = detect_family(pipe)
    layout = MEAN if family.cfg else FULL
    variant = GraphVariant("record", family.cfg, capture=((kind, layout),))
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    module = VariantUNet(pipe.unet, variant, family)
    names = module.kinds[kind][1]
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    plan = [Step(i, family.cfg, capture=((kind, layout),)) for i in range(len(timesteps))]
    sums = {name: torch.zeros(len(timesteps) - 1, dtype=torch.float64) for name in names}
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            gens = [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
            feeds = encode_conditioning(pipe, family, chunk, None, guidance_scale, height, width)
            pipe.scheduler.set_timesteps(steps, device=device)
            dtype = feeds[mf.PROMPT_EMBEDS].dtype
            shape = (len(chunk), pipe.unet.config.in_channels, height, width)
            latents = pipe.prepare_latents(*shape, dtype, torch.device("cpu"), gens).to(device)
            runner = _Recorder(module, names, sums)
            conditioning = {n: feeds[n] for n in module.conditioning}
            denoise(
                plan, (variant,), {kind: []}, runner, lambda _, c=conditioning: c, pipe.scheduler, latents, extra,
                (lambda *_: progress()) if progress else None,
            )  # fmt: skip
    finally:
        remove_tgate(pipe.unet)
    curves = {name: (s / len(prompts)).tolist() for name, s in sums.items()}
    return names, curves, timesteps


def mean_curve(curves: dict[str, list[float]]) -> list[float]:
    import torch

    return torch.tensor(list(curves.values()), dtype=torch.float64).mean(dim=0).tolist()


def plot(report: dict[str, Any], path: Path) -> None:
    """A thin curve per layer, the thick mean, the threshold line and the chosen gate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, many = report["step_axis"], len(report["curves"]) > 24
    for name, curve in report["curves"].items():
        label = None if many else name.replace(".transformer_blocks", "").replace(".attentions", "")
        ax.plot(xs, curve, linewidth=0.8, alpha=0.6, label=label)
    ax.plot(xs, report["mean"], color="black", linewidth=2.5, label="mean")
    ax.axhline(report["threshold"], color="red", linestyle="--", linewidth=1, label="threshold")
    gate = report["gate"]
    if gate is not None:
        ax.axvline(gate, color="green", linestyle=":", linewidth=1.5, label=f"gate = {gate}")
    values = [v for c in report["curves"].values() for v in c] + [report["threshold"]]
    if all(v is not None and v > 0 and math.isfinite(v) for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("denoising step i")
    ax.set_ylabel("||a_i - a_(i-1)|| / ||a_(i-1)||")
    kind, n = report.get("kind", "attn2"), len(report["prompts"])
    ax.set_title(f"{kind} convergence: {report['model']}, {report['steps']} steps, {n} prompt(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png")  # into the report's stage (ReportFiles), or with atomic_save


SAMPLING = SamplingArgs(
    steps=25,
    min_steps=2,
    steps_why=" (a change needs two steps)",
    gate=None,
    gate_upto_steps=True,
    guidance=7.5,
    guidance_flag="--guidance-scale",
    seed=0,
    help={
        "gate": "gate step to mark on the plot, 1..--steps (default: the suggestion)",
        "guidance_scale": "CFG guidance scale of the plain run, 0..100",
        "seed": "noise seed, 0..2**63-1; prompt j uses seed + j",
    },
)
SIZE = SizeArgs(
    max_side=MAX_SIDE,
    unset="the model's",
    help={"max_pixels": "cap on height*width, a memory budget (default: 4x the model's native size)"},
)
OUTPUT = OutputArgs.report(Path("out/analyze"), (JSON_NAME, PNG_NAME))
GROUPS = (SAMPLING, SIZE, OUTPUT)


def build_parser() -> Parser:
    p = Parser(
        prog="tgate-analyze",
        description="Record how much each attn2 (or attn1) output changes per denoising step (plain CFG run) and "
        "suggest a T-GATE gate step.",
    )
    p.add_argument("--model", required=True, help="preset, local diffusers folder, checkpoint or hub id")
    p.add_argument("--random-weights", action="store_true", help="a preset's architecture, random weights")
    p.add_argument("--config", help="diffusers folder with configs + tokenizer for a single-file checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="text file, one prompt per line (blank lines skipped)")
    src.add_argument("--prompt", help="a single prompt")
    p.add_argument(
        "--kind", default="attn2", choices=KINDS, help="attention outputs recorded: attn2 (cross) or attn1 (self)"
    )
    p.add_argument("--threshold", type=float, default=0.05, help="mean relative change counted as converged")
    p.add_argument("--batch-size", type=int, default=4, help=f"prompts per UNet batch, 1..{limits.MAX_BATCH}")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    for group in GROUPS:
        group.add_to(p)
    return p


def _check_args(args: argparse.Namespace) -> list[str]:
    """The numbers and the prompts: everything that needs no model."""
    parse(args, SAMPLING, SIZE)
    if not (args.threshold > 0 and math.isfinite(args.threshold)):
        raise UsageError(f"--threshold must be a positive number, got {args.threshold}")
    limits.check_int("--batch-size", args.batch_size, 1, limits.MAX_BATCH)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        prompts = [args.prompt]
    else:
        prompts = read_prompts(args.prompts)
    limits.check_int("--seed", args.seed, 0, limits.SEED_MAX - len(prompts) + 1, " (prompt j uses seed + j)")
    return prompts


def size_rule(unet: dict[str, Any], vae: dict[str, Any]) -> tuple[int, int]:
    """(multiple, native side) of a model's image size, from its UNet and VAE configs."""
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return factor * 2 ** (len(unet["block_out_channels"]) - 1), unet["sample_size"] * factor


def check_size(args: argparse.Namespace, multiple: int, native: int) -> tuple[int, int]:
    """``--height``/``--width`` (default: native) against what the model takes; the cap is a memory budget."""
    height = native if args.height is None else args.height
    width = native if args.width is None else args.width
    if height % multiple or width % multiple:
        raise UsageError(
            f"--height and --width must be multiples of {multiple} for model {args.model}, got {height}x{width}"
        )
    cap = args.max_pixels if args.max_pixels is not None else limits.default_max_pixels(native, native)
    return limits.check_size(height, width, multiple, cap)


def _preset_size(args: argparse.Namespace) -> None:
    """A preset's size rule is known from its configs: refuse a bad size before building the model."""
    from ..families import ARCHITECTURES

    arch = ARCHITECTURES.get(args.model)
    if arch is not None and (args.random_weights or args.model.startswith("tiny")):
        check_size(args, *size_rule(arch["unet"], arch["vae"]))


@command("tgate-analyze")
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    prompts = _check_args(args)
    model_path = Path(args.model).expanduser()
    report = ReportFiles(
        args.out,
        (JSON_NAME, PNG_NAME),
        "tgate-analyze",
        force=args.force,
        sources=[args.prompts, args.config, model_path if model_path.exists() else None],
        report_keys=("curves", "mean"),
    )
    report.check()
    _preset_size(args)
    from tqdm import tqdm

    from ..families import PRESETS, resolve_model

    with report as stage:  # locked for the run; both files appear together at the end
        if PRESETS.get(args.model) or model_path.exists() or args.model.count("/") == 1:  # full size: ~25 s
            print(f"tgate-analyze: loading {args.model}...", file=sys.stderr, flush=True)
        source = resolve_model(args.model, args.random_weights, args.config)
        pipe = source.pipe
        unet, vae = dict(pipe.unet.config), dict(pipe.vae.config)
        height, width = check_size(args, *size_rule(unet, vae))
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)
        n_batches = math.ceil(len(prompts) / args.batch_size)
        with tqdm(total=n_batches * args.steps, desc="analyze", unit="step", file=sys.stderr) as bar:
            names, curves, timesteps = convergence_curves(
                pipe, prompts, args.steps, seed=args.seed, guidance_scale=args.guidance_scale,
                height=height, width=width, batch_size=args.batch_size, progress=lambda: bar.update(1),
                kind=args.kind,
            )  # fmt: skip
        mean = mean_curve(curves)
        suggested = suggest_gate(mean, args.threshold)
        result = {
            "model": args.model,
            "source": source.source,
            "steps": args.steps,
            "kind": args.kind,
            "seed": args.seed,
            "guidance_scale": args.guidance_scale,
            "height": height,
            "width": width,
            "threshold": args.threshold,
            "suggested_gate": suggested,
            "gate": args.gate if args.gate is not None else suggested,
            "prompts": prompts,
            "layers": names,
            "step_axis": list(range(1, len(timesteps))),
            "timesteps": timesteps,
            "curves": curves,
            "mean": mean,
        }
        result = json_safe(result)  # a NaN change (a model that overflows) is recorded as null
        write_json(stage / JSON_NAME, result)
        plot(result, stage / PNG_NAME)
    print(f"{'step':>4}  {'mean change':>11}")
    for step, value in zip(result["step_axis"], mean, strict=True):
        print(f"{step:>4}  {value:>11.4f}{'  <' if value < args.threshold else ''}")
    if suggested is None:
        print(f"no suggestion: the mean change is still >= {args.threshold} at the last step")
    else:
        print(f"suggested gate: {suggested} (mean change < {args.threshold} from step {suggested} on)")
    print(f"wrote {', '.join(map(str, report.paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
