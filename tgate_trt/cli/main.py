"""``tgate SUBCOMMAND ...``: every tool behind one command; ``tgate-export`` and friends stay as aliases.

Each subcommand is the stage's own CLI (its parser, its one-line errors), so ``tgate run ...`` and
``tgate-run ...`` accept exactly the same arguments and behave the same. The options several tools share
come from the argument groups of :mod:`tgate_trt.contract.args` (one definition, one check each), which
``tgate --help`` lists.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ..contract.args import GROUPS

# subcommand -> (module, function, one-line summary); the alias is ``tgate-<subcommand>``
COMMANDS: dict[str, tuple[str, str, str]] = {
    "export": ("tgate_trt.engines.cli", "export_main", "a diffusers pipeline -> validated T-GATE ONNX graphs"),
    "build": ("tgate_trt.engines.cli", "main", "engines from an export: TensorRT plans or OpenVINO IR"),
    "run": ("tgate_trt.runtime.cli", "main", "generate images from an export (ONNX Runtime, OpenVINO, TensorRT)"),
    "serve": ("tgate_trt.triton.cli", "main", "a Triton model repository for an export, and a local server"),
    "quantize": ("tgate_trt.export.quantize", "main", "an int8 copy of an export for CPUs"),
    "bench": ("tgate_trt.tools.bench", "main", "time our pipelines beside the peers a user would pick"),
    "eval": ("tgate_trt.tools.evaluate", "main", "image quality of gating on the shapes model"),
    "macs": ("tgate_trt.tools.macs", "main", "count MACs of an export's graphs per plan"),
    "analyze": ("tgate_trt.tools.analyze", "main", "how attention outputs converge over the steps"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tgate SUBCOMMAND [ARGS...]   (tgate SUBCOMMAND --help for its arguments)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Each is also installed as tgate-SUBCOMMAND (tgate-triton for serve)."]
    lines += ["", "argument groups shared by the subcommands (the same options, defaults per tool, the same checks):"]
    width = max(len(group.title) for group in GROUPS)
    lines += [f"  {group.title:<{width}}  {' '.join(group.flags)}" for group in GROUPS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"tgate: error: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), function)(rest))


if __name__ == "__main__":
    sys.exit(main())
