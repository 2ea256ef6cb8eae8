#!/usr/bin/env bash
# The main job on the built-in shapes model (trained by this project, shipped in the package): export +
# validate against PyTorch, then run the T-GATE pipeline on ONNX Runtime, write out/shapes.png (a red
# circle on the left) and print the timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tgate-export --model shapes --out out/shapes --force
tgate-run out/shapes "a red circle on the left" --steps 25 --gate 10 --seed 0 --out out/shapes.png
