#!/usr/bin/env bash
# The main job on the built-in tiny model: export + validate against PyTorch, then run the T-GATE
# pipeline on ONNX Runtime, write out/tiny.png and print the timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tgate-export --model tiny --out out/tiny --force
tgate-run out/tiny "a red circle on the left" --steps 25 --gate 10 --seed 0 --out out/tiny.png
