"""Train the ``shapes`` model from scratch on CPU (VAE, text encoder, UNet), resumably.

    python scripts/train_shapes.py --out out/shapes-weights      # a new copy of the weights
    python scripts/train_shapes.py --overwrite-shipped           # replace the package's shipped weights
    python scripts/train_shapes.py --out DIR --work .train_shapes  # checkpoints there; rerun to resume

The result is deterministic for a seed and thread count; ``weights.json`` beside the weights records
this command, the training time per stage and the sha256 of every file.
"""

from __future__ import annotations

import sys

from tgate_trt.zoo.shapes.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script="python scripts/train_shapes.py"))
