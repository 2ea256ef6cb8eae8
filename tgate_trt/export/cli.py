"""``tgate-export``: a diffusers SD/SDXL/LCM pipeline -> two T-GATE UNet graphs + text encoder(s) + VAE decoder."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from ..contract.args import OutputArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..families import PRESETS
from ..methods.variants import SCHEDULES
from .exporter import DTYPES, MAX_OPSET, MIN_OPSET, STAGES, ExportRequest, check_request, run_export
from .validate import format_table


class EnginesHook(Protocol):
    """What ``--engines`` needs from the engines stage, which may import export but not the reverse."""

    def check(self) -> str | None:
        """An error message when engines can't be built here (checked before any export work)."""

    def build(self, export_dir: Path) -> int:
        """Build engines for a finished export; returns an exit code."""


SIZE = SizeArgs(
    max_pixels=False,
    unset="the model's native size",
    context="traced and validated at",
)
OUTPUT = OutputArgs.folder("export folder (created atomically)")
GROUPS = (SIZE, OUTPUT)


def build_parser() -> Parser:
    p = Parser(
        prog="tgate-export",
        description="Export a Stable Diffusion pipeline as T-GATE ONNX graphs (pre-gate and post-gate "
        "UNet, text encoder, VAE decoder), validated against PyTorch.",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"preset ({', '.join(PRESETS)}), local diffusers folder, .safetensors/.ckpt file, or hub id",
    )
    p.add_argument("--dtype", default="fp32", help=f"{' | '.join(DTYPES)} (fp16 for GPU targets)")
    p.add_argument("--opset", type=int, default=18, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    p.add_argument("--random-weights", action="store_true", help="build a preset's architecture with random weights")
    p.add_argument("--config", help="local diffusers folder with configs + tokenizer for a single-file checkpoint")
    p.add_argument(
        "--lcm-lora", help="LCM-LoRA .safetensors to fuse into the UNet (the export becomes guidance-free, LCM)"
    )
    p.add_argument(
        "--schedule",
        default="v1",
        choices=SCHEDULES,
        help="v1: cross-attention cached (pre/post-gate graphs); v2: self-attention cached on a schedule too "
        "(the authors' default; five UNet graph variants)",
    )
    p.add_argument("--engines", action="store_true", help="then build TensorRT engines into OUT/engines (GPU host)")
    for group in GROUPS:
        group.add_to(p)
    return p


@command("tgate-export")
def main(argv: Sequence[str], engines: EnginesHook | None = None) -> int:
    args = parse(build_parser().parse_args(argv), *GROUPS)
    if args.engines:
        problem = "--engines needs the tgate-export command (the engines stage)" if engines is None else None
        problem = problem or (engines.check() if engines else None)
        if problem:
            raise UsageError(problem)
    req = ExportRequest(
        model=args.model,
        out=args.out,
        dtype=args.dtype,
        opset=args.opset,
        height=args.height,
        width=args.width,
        random_weights=args.random_weights,
        config=args.config,
        lcm_lora=args.lcm_lora,
        force=args.force,
        schedule=args.schedule,
    )
    check_request(req)  # before the progress bar: a refusal is one line
    bar = tqdm(total=len(STAGES), desc="export", unit="stage", file=sys.stderr)

    def progress(msg: str) -> None:
        if bar.n or msg != STAGES[0]:
            bar.update(1)
        bar.set_postfix_str(msg)

    try:
        manifest, checks = run_export(req, progress)
        bar.update(bar.total - bar.n)
    except BaseException:
        bar.leave = False  # a late error stays the one line on the terminal
        raise
    finally:
        bar.close()
    print(format_table(checks))
    sizes = ", ".join(f"{key} {manifest.graphs[key].parameters:,}" for key in manifest.variants)
    sites = manifest.sites
    print(
        f"\nexported {args.model} ({manifest.model.family}, {manifest.dtype}, opset {manifest.opset}, schedule "
        f"{manifest.schedule}) to {args.out}: {len(sites['attn2'])} attn2 and {len(sites['attn1'])} attn1 cache "
        f"sites; UNet parameters per graph: {sizes}"
    )
    if args.engines and engines is not None:
        return engines.build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
