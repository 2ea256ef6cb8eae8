#!/usr/bin/env bash
# Lint and run the whole test suite on a fresh machine (installs what it needs first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
bash scripts/typecheck_trt.sh
python -m pytest -q "$@"
