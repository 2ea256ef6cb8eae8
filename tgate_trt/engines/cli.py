"""``tgate-build``: TensorRT plans for an export folder, built on the machine that will run them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..manifest import ManifestError
from .build import TensorRTMissing, build_engines, import_tensorrt
from .options import HARDWARE_COMPAT, BuildOptions, parse_range


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgate-build", description="Build TensorRT engines from a tgate-export folder."
    )
    p.add_argument("export_dir", type=Path, help="folder written by tgate-export")
    p.add_argument("--out", type=Path, default=None, help="where plans go (default: EXPORT_DIR/engines)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (optimal batch)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the export's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the export's)")
    p.add_argument("--fp16", action="store_true", help="fp16 kernels (FP16 flag on fp32 exports)")
    p.add_argument(
        "--strongly-typed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the ONNX types (default: on for fp16 exports)",
    )
    p.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="NAME=MIN:MAX",
        help="dynamic range for batch, height or width (repeatable; default: static, CUDA-graph ready)",
    )
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file, read and updated")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--workspace-gib", type=float, default=None, help="workspace memory limit in GiB")
    p.add_argument("--hardware-compat", default="none", choices=tuple(HARDWARE_COMPAT))
    p.add_argument(
        "--version-compatible", action="store_true", help="plans for later TensorRT (lean runtime)"
    )
    p.add_argument(
        "--exclude-lean-runtime", action="store_true", help="with --version-compatible: smaller plans"
    )
    p.add_argument(
        "--strip-weights", action="store_true", help="weightless plans, refitted from the ONNX at load"
    )
    return p


def _fail(msg: str) -> int:
    print(f"tgate-build: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = BuildOptions(
            fp16=args.fp16,
            strongly_typed=args.strongly_typed,
            timing_cache=args.timing_cache,
            optimization_level=args.opt_level,
            workspace_gib=args.workspace_gib,
            hardware_compat=args.hardware_compat,
            version_compatible=args.version_compatible,
            exclude_lean_runtime=args.exclude_lean_runtime,
            strip_weights=args.strip_weights,
            dynamic=dict(parse_range(r) for r in args.dynamic),
        )
        from ..manifest import Manifest

        defaults = Manifest.load(args.export_dir, verify=False).defaults
        height = args.height or defaults["height"]
        width = args.width or defaults["width"]
        out = args.out or args.export_dir / "engines"
        section = build_engines(args.export_dir, out, options, args.batch, height, width)
    except TensorRTMissing as exc:
        return _fail(str(exc))
    except (ManifestError, ValueError) as exc:
        return _fail(str(exc))
    for key, plan in section["plans"].items():
        print(
            f"{key:<14} {out / plan['file']}  {plan['bytes'] / 2**20:8.1f} MiB  sha256 {plan['sha256'][:12]}"
        )
    gpu = section["gpu"]
    print(
        f"TensorRT {section['tensorrt']} on {gpu['name']} (sm {gpu['compute_capability']}), "
        f"{width}x{height} batch {args.batch}"
    )
    return 0


class _BuildAfterExport:
    """``tgate-export --engines``: TensorRT is checked before the export starts, plans built after."""

    def check(self) -> str | None:
        try:
            import_tensorrt()
        except TensorRTMissing as exc:
            return str(exc)
        return None

    def build(self, export_dir: Path) -> int:
        return main([str(export_dir)])


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of ``tgate-export``: the export stage's CLI with ``--engines`` wired in."""
    from ..export.cli import main as export

    return export(argv, engines=_BuildAfterExport())


if __name__ == "__main__":
    sys.exit(main())
