#!/usr/bin/env bash
# Type-check the TensorRT code against tensorrt-stubs (the real TensorRT can't be installed here).
# The stubs ship without py.typed and contain a few lines mypy can't parse (parameters named `in`,
# a required argument after defaults, a module-level `bool`), so a patched copy is checked against.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
SP=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp -r "$SP/tensorrt" "$SP/tensorrt_bindings" "$T/"
sed -i -E 's/([(,] ?)in: /\1in_: /g; s/channel_axis: int\)/channel_axis: int = ...)/; /^bool: DataType/d' \
    "$T/tensorrt_bindings/tensorrt.pyi"
# Only the TensorRT code is under check; the stubs, the families and the export stage (reached through
# `tgate-export --engines`, typed loosely by diffusers' lazy imports) are followed but not judged.
printf '[mypy]\nignore_missing_imports = True\n[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,tgate_trt.export.*,tgate_trt.families.*]\nignore_errors = True\n' \
    > "$T/mypy.ini"
MYPYPATH=$T mypy --config-file "$T/mypy.ini" --disallow-untyped-defs --disallow-incomplete-defs \
    --check-untyped-defs --warn-unused-ignores --warn-redundant-casts \
    tgate_trt/engines tgate_trt/contract tgate_trt/runtime/trt_engine.py tgate_trt/runtime/ov_engine.py
