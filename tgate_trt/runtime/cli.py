"""``tgate-run``: generate an image from an export folder, with a progress bar and a timing table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import manifest as mf
from ..contract import limits
from ..contract.args import BackendArgs, OutputArgs, SamplingArgs, ScheduleArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..contract.files import atomic_save, check_output_file
from ..methods.plan import TGateParams
from ..methods.variants import schedule_of
from .conditioning import count_tokens, load_tokenizer
from .pipeline import (
    BACKENDS,
    SCHEDULERS,
    TGatePipeline,
    check_prompt_text,
    check_token_counts,
    format_timings,
)

DEFAULT_OUT = Path("out", "image.png")  # out/ (made when missing) in the current folder: never a tracked file


SAMPLING = SamplingArgs(steps=None, gate=None, guidance=None, seed=0)
SIZE = SizeArgs()
SCHEDULE = ScheduleArgs(context="an export made with --schedule v2")
BACKEND = BackendArgs(backends=BACKENDS, engines=None)
OUTPUT = OutputArgs(
    out=DEFAULT_OUT, out_help="PNG path (index added for batch > 1); an existing file is replaced, with a note"
)
GROUPS = (SAMPLING, SIZE, SCHEDULE, BACKEND, OUTPUT)


def build_parser() -> Parser:
    p = Parser(prog="tgate-run", description="Run the T-GATE pipeline on an export folder.")
    p.add_argument("export_dir", type=Path, help="folder written by tgate-export")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="default: the export's own (else ddim)")
    p.add_argument(
        "--save-latents",
        type=Path,
        default=None,
        metavar="FILE.npy",
        help="also write the final latents (before the VAE, float32 [B,C,h,w]) so runs can be compared exactly",
    )
    for group in GROUPS:
        group.add_to(p)
    return p


def image_paths(out: Path, batch: int) -> list[Path]:
    """``--out`` itself for one image, ``NAME_<i>.png`` beside it for a batch."""
    return [out] if batch == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


@command("tgate-run")
def main(argv: Sequence[str]) -> int:
    args = parse(build_parser().parse_args(argv), *GROUPS)
    # cheap checks first (milliseconds), then the manifest's schema, then hashes and loading
    limits.check_batch(args.batch)
    for path in dict.fromkeys([args.out, *image_paths(args.out, args.batch)]):
        check_output_file(path, (".png",), create=args.out == DEFAULT_OUT)
    if args.save_latents is not None:
        check_output_file(args.save_latents, (".npy",), "--save-latents")
    manifest = mf.Manifest.load(args.export_dir, verify=False)
    defaults = manifest.defaults
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.gate = defaults["gate_step"] if args.gate is None else args.gate
    args.guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    h = defaults["height"] if args.height is None else args.height
    w = defaults["width"] if args.width is None else args.width
    params = TGateParams(
        args.gate,
        defaults["sp_interval"] if args.sp_interval is None else args.sp_interval,
        defaults["fi_interval"] if args.fi_interval is None else args.fi_interval,
        defaults["warm_up"] if args.warm_up is None else args.warm_up,
    )
    if schedule_of(params) == "v2" and manifest.schedule == "v1":
        raise UsageError(
            "--sp-interval/--fi-interval/--warm-up cache self-attention, which this export (--schedule v1) "
            "can't: re-export with tgate-export --schedule v2, or leave them at 1/1/0"
        )
    manifest.check_native_size(h, w)
    manifest.latent_size(h, w, args.max_pixels)
    prompts = [args.prompt] * args.batch
    negatives = None if args.negative is None else [args.negative] * args.batch
    check_prompt_text(prompts, negatives, manifest.model)
    # then hashes: the tokenizer, scheduler and configs first, so a prompt is judged before any graph loads
    manifest.verify(args.export_dir, graphs=())
    counts = count_tokens(load_tokenizer(args.export_dir, manifest), prompts[:1])
    check_token_counts(counts)
    pipe = TGatePipeline.from_export(
        args.export_dir, backend=args.backend, threads=args.threads, engines=args.engines, max_pixels=args.max_pixels
    )
    pipe.check(prompts, negatives, args.steps, args.gate, args.guidance, h, w)
    for tokens in pipe.truncated(prompts[:1]).values():
        print(
            f"tgate-run: warning: the prompt has {tokens} tokens; the text encoder reads the first "
            f"{pipe.conditioner.window}, the rest is ignored",
            file=sys.stderr,
        )
    for path in image_paths(args.out, args.batch) + ([args.save_latents] if args.save_latents else []):
        if path.exists():
            print(f"tgate-run: note: {path} exists and will be replaced", file=sys.stderr)
    with tqdm(total=args.steps, desc="denoise", unit="step", file=sys.stderr) as bar:
        result = pipe(
            prompts,
            negative_prompt=args.negative,
            num_inference_steps=args.steps,
            gate_step=args.gate,
            guidance_scale=args.guidance,
            height=h,
            width=w,
            seed=args.seed,
            scheduler=args.scheduler,
            progress=lambda i: bar.update(1),
            sp_interval=params.sp_interval,
            fi_interval=params.fi_interval,
            warm_up=params.warm_up,
        )
    paths = image_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        atomic_save(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
    if args.save_latents is not None:
        atomic_save(args.save_latents, lambda tmp: np.save(tmp, result.latents.astype(np.float32)))
        paths.append(args.save_latents)
    gate = f"gate {args.gate}" if args.gate < args.steps else "no gate"
    print(f"{args.steps} steps, {gate}, seed {args.seed}, {w}x{h} -> {', '.join(map(str, paths))}")
    print(format_timings(result.timings, result.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
