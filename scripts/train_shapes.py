"""Train the shipped ``shapes`` model from scratch on CPU (VAE, text encoder, UNet), resumably.

    python scripts/train_shapes.py                       # writes tgate_trt/export/shapes/weights
    python scripts/train_shapes.py --work .train_shapes  # checkpoints here; rerun to resume

The result is deterministic for a seed and thread count; ``weights.json`` beside the weights records
this command, the training time per stage and the sha256 of every file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tgate_trt.export.shapes import WEIGHTS
from tgate_trt.export.shapes.train import Interrupted, TrainConfig, config_with, tiny_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="diffusers folder to write (default: the package's)")
    parser.add_argument("--work", type=Path, default=Path(".train_shapes"), help="checkpoint folder (resume)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--text-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a smaller model (smoke test)")
    parser.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps (resume later)")
    parser.add_argument("--fp32", action="store_true", help="save float32 weights instead of float16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tiny_config() if args.tiny else TrainConfig()
    cfg.seed, cfg.stop_after = args.seed, args.stop_after
    steps = {k: v for k, v in {"vae": args.vae_steps, "text": args.text_steps, "unet": args.unet_steps}.items() if v}
    cfg = config_with(cfg, **steps)
    command = shlex.join(["python", "scripts/train_shapes.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        out = train(args.out, args.work, cfg, command, torch.float32 if args.fp32 else torch.float16)
    except Interrupted as exc:
        print(exc)
        return 3
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
