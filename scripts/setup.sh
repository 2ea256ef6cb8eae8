#!/usr/bin/env bash
# Create .venv with the pinned stack. torch is installed first, by exact version, so that pip takes
# the CPU wheel and no resolver pulls a multi-GB CUDA build. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# The triton extra is tritonclient and nvidia-pytriton, whose wheel ships a real tritonserver with the
# Python backend (used by tgate-triton --serve and tests/test_triton.py). Its dependencies keep numpy<2
# and do not touch torch. The openvino extra is OpenVINO, NNCF (int8 weights) and optimum-intel.
python -m pip install -q -e ".[dev,triton,openvino]"
# Type stubs for checking the TensorRT code; --no-deps because their metadata pulls in the real
# TensorRT, which can't be installed from PyPI alone.
python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
