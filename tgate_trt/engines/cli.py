"""``tgate-build``: TensorRT plans for an export folder, built on the machine that will run them."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import manifest as mf
from ..contract import limits
from ..contract.args import BackendArgs, OutputArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..contract.files import check_output_folder, writer_lock
from .build import TensorRTMissing, build_engines, import_tensorrt
from .openvino import DEVICES as OV_DEVICES
from .openvino import OV_DIR, build_openvino, format_validation
from .openvino import PRECISIONS as OV_PRECISIONS
from .options import HARDWARE_COMPAT, BuildOptions, builder_settings, parse_range
from .profiles import all_profiles

TARGETS = ("tensorrt", "openvino")


OUTPUT = OutputArgs(
    out=None,
    out_help="where engines go (default: EXPORT_DIR/engines for TensorRT, EXPORT_DIR/openvino for OpenVINO, "
    "which must be a folder directly inside EXPORT_DIR)",
)
THREADS = BackendArgs(threads_zero="every core allowed")  # OpenVINO's inference threads
SIZE = SizeArgs(max_pixels=False)  # TensorRT's profile size; the export's cap applies
GROUPS = (OUTPUT, THREADS, SIZE)


def build_parser() -> Parser:
    p = Parser(
        prog="tgate-build",
        description="Build engines from a tgate-export folder: TensorRT plans (NVIDIA GPUs) or OpenVINO IR "
        "(Intel CPUs and GPUs).",
    )
    p.add_argument("export_dir", type=Path, help="folder written by tgate-export")
    p.add_argument("--target", default="tensorrt", choices=TARGETS, help="engine kind (default: tensorrt)")
    OUTPUT.add_to(p)
    ov = p.add_argument_group("OpenVINO (--target openvino)")
    ov.add_argument(
        "--precision",
        default=None,
        choices=OV_PRECISIONS,
        help="bf16 (CPUs with AMX/AVX-512 BF16), f16 (Intel GPUs), f32, or int8w (NNCF int8 weights); "
        "default: bf16 where the CPU has it, else f32; f16 on GPU",
    )
    ov.add_argument("--device", default="CPU", choices=OV_DEVICES, help="OpenVINO device (default: CPU)")
    THREADS.add_to(ov)
    trt = p.add_argument_group("TensorRT (--target tensorrt)")
    trt.add_argument("--batch", type=int, default=1, help="images per prompt (optimal batch)")
    SIZE.add_to(trt)
    trt.add_argument("--fp16", action="store_true", help="fp16 kernels (FP16 flag on fp32 exports)")
    trt.add_argument(
        "--strongly-typed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the ONNX types (default: on for fp16 exports)",
    )
    trt.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="NAME=MIN:MAX",
        help="dynamic range for batch, height or width (repeatable; default: static, CUDA-graph ready)",
    )
    trt.add_argument("--timing-cache", type=Path, default=None, help="timing cache file, read and updated")
    trt.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    trt.add_argument("--workspace-gib", type=float, default=None, help="workspace memory limit in GiB")
    trt.add_argument(
        "--hardware-compat",
        default="none",
        choices=tuple(HARDWARE_COMPAT),
        help="none: plans for this GPU's architecture; ampere+: plans that run on any Ampere or later GPU",
    )
    trt.add_argument("--version-compatible", action="store_true", help="plans for later TensorRT (lean runtime)")
    trt.add_argument("--exclude-lean-runtime", action="store_true", help="with --version-compatible: smaller plans")
    trt.add_argument("--strip-weights", action="store_true", help="weightless plans, refitted from the ONNX at load")
    trt.add_argument(
        "--gated-unet",
        action="store_true",
        help="one UNet plan for every variant (one copy of the weights on the GPU; docs/tensorrt-weights.md)",
    )
    return p


def _openvino(args: argparse.Namespace) -> int:
    export = args.export_dir
    out = args.out or export / OV_DIR
    if out.resolve().parent != export.resolve():
        raise UsageError(
            f"--out for OpenVINO must be a folder directly inside {export} (the manifest names it), got {out}"
        )
    section = build_openvino(export, out.name, args.precision, args.device, args.threads)
    print(format_validation(section["validation"]["rows"]))
    files = {rel for g in section["graphs"].values() for rel in g["files"]}
    size = (
        sum((export / rel).stat().st_size for rel in files) / 2**20 + section.get("weights", {}).get("bytes", 0) / 2**20
    )
    print(
        f"OpenVINO {section['openvino']} on {section['device']} ({section['device_name']}), {section['precision']}: "
        f"wrote {out} ({size:.1f} MiB) and its section in {export / 'manifest.json'}; "
        f"run with: tgate-run {export} PROMPT --backend openvino"
        + ("" if out.name == OV_DIR else f" --engines {out.name}")
    )
    return 0


@command("tgate-build")
def main(argv: Sequence[str]) -> int:
    args = parse(build_parser().parse_args(argv), *GROUPS)
    if args.target == "openvino":
        return _openvino(args)
    # cheap checks first: numbers, options, the manifest's schema, sizes, --out; then TensorRT; then hashes
    limits.check_batch(args.batch)
    if args.workspace_gib is not None:
        limits.check_float("--workspace-gib", args.workspace_gib, 0.0, 1e6, " (GiB)")
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
    manifest = mf.Manifest.load(args.export_dir, verify=False)
    if mf.QUANTIZATION in manifest.extra:
        raise UsageError(
            f"{args.export_dir} is an int8 copy for ONNX Runtime on CPUs (tgate-quantize): build engines from "
            "its fp32 or fp16 source export"
        )
    defaults = manifest.defaults
    height = defaults["height"] if args.height is None else args.height
    width = defaults["width"] if args.width is None else args.width
    all_profiles(manifest, args.batch, height, width, options.dynamic)  # sizes the graphs can't take
    builder_settings(options, manifest)
    out = args.out or args.export_dir / "engines"
    if out.resolve() == args.export_dir.resolve() or out.resolve() in args.export_dir.resolve().parents:
        raise UsageError(
            f"--out {out} is or contains the export {args.export_dir}: name a folder for the engines, "
            f"e.g. {args.export_dir / 'engines'}"
        )
    check_output_folder(out)
    import_tensorrt()
    with writer_lock(out):
        for stale in sorted(out.glob(".tgate-build-*")):  # work folders of killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}, left by an interrupted build", file=sys.stderr)
        # graphs None: every graph of the export
        section = build_engines(args.export_dir, out, options, args.batch, height, width, None, args.gated_unet)
    for key, plan in section["plans"].items():
        print(f"{key:<14} {out / plan['file']}  {plan['bytes'] / 2**20:8.1f} MiB  sha256 {plan['sha256'][:12]}")
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
