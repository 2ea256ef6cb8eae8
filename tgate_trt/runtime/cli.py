"""``tgate-run``: generate an image from an export folder, with a progress bar and a timing table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..manifest import ManifestError
from .pipeline import BACKENDS, MAX_STEPS, SCHEDULERS, TGatePipeline, format_timings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgate-run", description="Run the T-GATE pipeline on an export folder.")
    p.add_argument("export_dir", type=Path, help="folder written by tgate-export")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps, 1..{MAX_STEPS} (default: the export's)")
    p.add_argument("--gate", type=int, default=None, help="gate step (>= steps: no gating; default: the export's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (CFG weight, or LCM's embedded guidance)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="default: the export's own (else ddim)")
    p.add_argument(
        "--backend",
        default="ort",
        choices=BACKENDS,
        help="ort (ONNX Runtime, default), openvino (needs tgate-build --target openvino) or trt (TensorRT)",
    )
    p.add_argument(
        "--engines", default=None, help="OpenVINO build folder inside the export (default: openvino)"
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: 0 = the backend's choice)")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="PNG path (index added for batch > 1)")
    p.add_argument(
        "--save-latents",
        type=Path,
        default=None,
        metavar="FILE.npy",
        help="also write the final latents (before the VAE, float32 [B,C,h,w]) so runs can be compared exactly",
    )
    return p


def _fail(msg: str) -> int:
    print(f"tgate-run: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1:
        return _fail(f"--batch must be >= 1, got {args.batch}")
    if args.threads < 0:
        return _fail(f"--threads must be >= 0 (0: the backend's choice), got {args.threads}")
    if args.engines is not None and args.backend != "openvino":
        return _fail("--engines names an OpenVINO build: use it with --backend openvino")
    if args.out.suffix.lower() != ".png":
        return _fail(f"--out must be a .png path, got {args.out}")
    if not args.out.parent.exists():
        return _fail(f"the folder of --out ({args.out.parent}) does not exist")
    if args.save_latents is not None and (
        args.save_latents.suffix != ".npy" or not args.save_latents.parent.is_dir()
    ):
        return _fail(f"--save-latents must be a .npy path in an existing folder, got {args.save_latents}")
    try:
        pipe = TGatePipeline.from_export(
            args.export_dir, backend=args.backend, threads=args.threads, engines=args.engines
        )
        prompts = [args.prompt] * args.batch
        defaults = pipe.manifest.defaults
        h = args.height or defaults["height"]
        w = args.width or defaults["width"]
        args.steps = defaults["steps"] if args.steps is None else args.steps
        args.gate = defaults["gate_step"] if args.gate is None else args.gate
        args.guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
        negatives = None if args.negative is None else [args.negative] * args.batch
        pipe.check(prompts, negatives, args.steps, args.gate, args.guidance, h, w)
    except (ManifestError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
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
        )
    paths = (
        [args.out]
        if len(result.images) == 1
        else [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}") for i in range(len(result.images))]
    )
    for image, path in zip(result.images, paths, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)
    if args.save_latents is not None:
        tmp = args.save_latents.with_name(f".{args.save_latents.name}.tmp.npy")
        np.save(tmp, result.latents.astype(np.float32))
        tmp.replace(args.save_latents)
        paths.append(args.save_latents)
    gate = f"gate {args.gate}" if args.gate < args.steps else "no gate"
    print(f"{args.steps} steps, {gate}, seed {args.seed}, {w}x{h} -> {', '.join(map(str, paths))}")
    print(format_timings(result.timings, result.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
