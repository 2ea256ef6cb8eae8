"""``tgate-quantize``: an int8 copy of an export for CPUs (dynamic quantization of the UNets' MatMul weights).

On a CPU, ONNX Runtime's fp32 convolutions and GEMMs already run near what the cores can do
(``benchmarks/README.md``), so lower precision is the lever left. Dynamic quantization needs no calibration
data: the weights of the MatMuls (the UNet's linear layers) are stored as int8 and activations are quantized
per call. Convolutions stay fp32 (ORT's integer convolutions are slower than its fp32 ones on x86), as do the
text encoder and VAE decoder, which are copied unchanged. The result is a complete export with the same
graph contract, new hashes, a ``quantization`` section in the manifest, and a check of each quantized graph
against its fp32 source. TensorRT builds from the fp32/fp16 export, not from this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..contract import limits
from ..contract.args import OutputArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UserError
from ..contract.files import OutputDir
from ..contract.quiet import ort_log_level
from .onnx_io import ScratchDir, SharedWeights, describe, random_feeds, relative_error

QUANTIZED_OPS = ("MatMul",)
SECTION = mf.QUANTIZATION
DEFAULT_TOLERANCE = 0.1  # relative L2 error per output vs fp32 (CFG at guidance 7.5 amplifies it in noise_pred)


class QuantizeError(UserError, RuntimeError):
    """A quantization that can't start or didn't pass its check; the message says what to change."""


def check_request(src: Path, out: Path, force: bool, tolerance: float = DEFAULT_TOLERANCE) -> mf.Manifest:
    """Everything that can be refused before minutes of work: numbers, the destination, the source's
    manifest, then its files' hashes."""
    limits.check_float("--tolerance", tolerance, 0.0, 1.0)
    OutputDir(out, force=force, sources=[src]).check()
    manifest = mf.Manifest.load(src, verify=False)
    if SECTION in manifest.extra:
        section = manifest.extra[SECTION]
        method = section.get("method", "int8") if isinstance(section, dict) else "int8"
        raise QuantizeError(f"{src} is already quantized ({method}): pass its fp32 source")
    if manifest.dtype != "fp32":
        raise QuantizeError(
            f"{src} is a {manifest.dtype} export; int8 quantization starts from fp32: re-export with --dtype fp32"
        )
    manifest.verify(src)
    return manifest


def _quantize_graph(src_model: Path, shared: SharedWeights, root: Path) -> mf.GraphSpec:
    """The int8 copy of one UNet variant, written beside the others with its weights in their shared file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # its advice to pre-process is for calibrated (static) quantization
    with ScratchDir(root) as scratch:
        raw = scratch / "model.onnx"
        try:
            quantize_dynamic(
                str(src_model),
                str(raw),
                op_types_to_quantize=list(QUANTIZED_OPS),
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
                extra_options={"MatMulConstBOnly": True},  # weights only; attention's activation MatMuls stay fp32
            )
        finally:
            root_logger.setLevel(level)
        params = shared.save(raw, src_model.name)
    return describe(shared.folder / src_model.name, root, params)


def relative_errors(manifest: mf.Manifest, src: Path, quantized: Path, key: str) -> dict[str, float]:
    """Relative L2 error of every output of ``key``, int8 against fp32, on seeded inputs at the default size."""
    import onnxruntime as ort

    lat_h, lat_w = manifest.latent_size(int(manifest.defaults["height"]), int(manifest.defaults["width"]))
    feeds = random_feeds(manifest, key, lat_h, lat_w)
    opts = ort.SessionOptions()
    opts.log_severity_level = ort_log_level()  # errors only; warnings too with --verbose
    outputs = []
    for root in (src, quantized):
        session = ort.InferenceSession(str(root / manifest.graphs[key].file), opts, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds))
        del session
    names = [o.name for o in manifest.graphs[key].outputs]
    return {name: relative_error(q, f) for name, f, q in zip(names, *outputs, strict=True)}


def quantize_export(
    src: Path, out: Path, force: bool = False, tolerance: float = DEFAULT_TOLERANCE
) -> tuple[mf.Manifest, dict[str, dict[str, float]]]:
    """Write the int8 copy of ``src`` to ``out`` (atomically); returns its manifest and the check's errors."""
    from tqdm import tqdm

    manifest = check_request(src, out, force, tolerance)
    with OutputDir(out, force=force, sources=[src]) as tmp:
        skip = {mf.MANIFEST_NAME, "engines", *manifest.extra.get("engines", {})}  # builds belong to the source
        unets = list(manifest.variants)  # every UNet graph variant (V1: pre- and post-gate)
        skip |= {Path(manifest.graphs[k].file).parent.name for k in unets}
        for item in src.iterdir():
            if item.name not in skip and not item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        graphs = dict(manifest.graphs)
        errors: dict[str, dict[str, float]] = {}
        folders = {Path(manifest.graphs[k].file).parent for k in unets}  # one (unet/), or one per graph (older)
        with contextlib.ExitStack() as stack:
            stores = {folder: stack.enter_context(SharedWeights(tmp / folder)) for folder in folders}
            for key in tqdm(unets, desc="quantize", unit="graph"):
                spec = manifest.graphs[key]
                graphs[key] = _quantize_graph(src / spec.file, stores[Path(spec.file).parent], tmp)
                errors[key] = relative_errors(manifest, src, tmp, key)
                worst = float(np.max(list(errors[key].values())))  # NaN anywhere is the worst, not skipped
                if not np.isfinite(worst) or worst > tolerance:
                    raise QuantizeError(
                        f"{key}: int8 output differs from fp32 by {worst:.3g} (relative L2) > {tolerance}: this "
                        "model does not tolerate int8 MatMuls; keep the fp32 export (or pass a larger --tolerance)"
                    )
        for rel in manifest.files:  # the UNet folders' configs, listed with the other files
            if not (tmp / rel).exists():
                shutil.copy2(src / rel, tmp / rel)
        section: dict[str, Any] = {
            "method": "dynamic int8 (onnxruntime.quantization.quantize_dynamic)",
            "ops": list(QUANTIZED_OPS),
            "weight_type": "QInt8",
            "graphs": unets,
            "source_manifest_sha256": mf.sha256_file(src / mf.MANIFEST_NAME),
            "check": {"metric": "relative L2 error vs fp32, seeded inputs", "tolerance": tolerance, "errors": errors},
        }
        extra = {k: v for k, v in manifest.extra.items() if k != "engines"}  # plans belong to the source
        result = dataclasses.replace(manifest, graphs=graphs, extra={**extra, SECTION: section})
        result.save(tmp)
    return result, errors


OUTPUT = OutputArgs.folder("folder for the int8 copy")


def build_parser() -> Parser:
    ap = Parser(prog="tgate-quantize", description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path, help="an fp32 tgate-export folder")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative L2 error allowed")
    OUTPUT.add_to(ap)
    return ap


@command("tgate-quantize")
def main(argv: Sequence[str]) -> int:
    args = parse(build_parser().parse_args(argv), OUTPUT)
    manifest, errors = quantize_export(args.export, args.out, args.force, args.tolerance)
    for key, errs in errors.items():
        spec = manifest.graphs[key]
        size = sum((args.out / f).stat().st_size for f in spec.files) / 2**20
        print(f"{key:<14} {size:9.1f} MiB  worst relative error {max(errs.values()):.2e}")
    print(f"wrote {args.out} (run it with: tgate-run {args.out} PROMPT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
