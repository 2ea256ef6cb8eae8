#!/usr/bin/env bash
# The main job on the built-in tiny model: export, validate against PyTorch, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tgate-export --model tiny --out out/tiny --force
