"""Weights held once across the UNet graph variants: on disk (one shared external-data file) and in ONNX
Runtime's memory (every variant a view of one session of the gated graph), with results unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tgate_trt import manifest as mf
from tgate_trt.runtime.engine import OrtEngine
from tgate_trt.runtime.ort_gated import OrtView
from tgate_trt.runtime.pipeline import TGatePipeline


def _external(model_file: Path) -> list[tuple[int, int]]:
    """(offset, length) of every external tensor of a graph."""
    model = onnx.load(str(model_file), load_external_data=False)
    out = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}
            assert where["location"] == "model.onnx_data"
            out.append((int(where.get("offset", 0)), int(where["length"])))
    return out


def _stored_once(root: Path) -> tuple[int, int, int]:
    """Check no tensor content is stored twice in the UNet's weights file; returns (bytes stored, bytes the
    variants reference, bytes of the largest variant's weights)."""
    manifest = mf.Manifest.load(root)
    data = (root / mf.UNET / "model.onnx_data").read_bytes()
    where: dict[str, set[int]] = {}
    referenced, largest = 0, 0
    for key in manifest.variants:
        spec = manifest.graphs[key]
        assert spec.file == f"unet/{key}.onnx" and "unet/model.onnx_data" in spec.files
        ranges = _external(root / spec.file)
        size = sum(length for _, length in set(ranges))
        referenced, largest = referenced + size, max(largest, size)
        for offset, length in ranges:
            where.setdefault(hashlib.sha256(data[offset : offset + length]).hexdigest(), set()).add(offset)
    assert all(len(offsets) == 1 for offsets in where.values()), "a tensor's bytes are stored more than once"
    stored = sum(
        length for offset, length in {r for k in manifest.variants for r in _external(root / manifest.graphs[k].file)}
    )
    assert len(data) < stored + 4096 * len(where)  # nothing but alignment padding besides the tensors
    return stored, referenced, largest


def test_v1_export_holds_each_unet_weight_once(tiny_export: Path) -> None:
    stored, referenced, largest = _stored_once(tiny_export)
    assert stored == largest  # the post-gate graph's weights are a subset of the pre-gate graph's
    assert referenced > 1.9 * stored  # two graphs, one copy


def test_v2_export_holds_each_unet_weight_once(v2_export) -> None:  # noqa: ANN001 (fixture factory)
    root = v2_export("tiny")
    stored, referenced, largest = _stored_once(root)
    assert len(mf.Manifest.load(root).variants) == 5
    assert stored == largest and referenced > 4.5 * stored


def test_shapes_export_holds_each_unet_weight_once(shapes_export: Path) -> None:
    stored, referenced, largest = _stored_once(shapes_export)
    assert stored == largest and referenced > 1.9 * stored


def test_shapes_results_unchanged_by_sharing(shapes_export: Path) -> None:
    shared, calls = _latents(shapes_export)
    separate, calls_separate = _latents(shapes_export, weights="separate", cpu_arena="session")
    assert calls == calls_separate
    assert float(np.abs(shared - separate).max()) <= 1e-6 * float(np.abs(separate).max())


def _latents(root: Path, **kw: object) -> tuple[np.ndarray, dict[str, int]]:
    pipe = TGatePipeline.from_export(root, **kw)  # type: ignore[arg-type]
    result = pipe("a red circle", num_inference_steps=8, gate_step=3, seed=5)
    return np.asarray(result.latents), {k: e.calls for k, e in pipe.engines.items()}


@pytest.mark.parametrize("schedule", ["v1", "v2"])
def test_shared_weights_leave_results_unchanged(tiny_export: Path, v2_export, schedule: str) -> None:  # noqa: ANN001
    root = tiny_export if schedule == "v1" else v2_export("tiny")
    pipe = TGatePipeline.from_export(root)
    views = [e for e in pipe.engines.values() if isinstance(e, OrtView)]
    assert {v.name for v in views} == set(pipe.manifest.variants)
    assert len({id(v.unet.session) for v in views}) == 1  # one session, so one copy of the weights
    shared, calls = _latents(root)
    separate, calls_separate = _latents(root, weights="separate", cpu_arena="session")
    assert calls == calls_separate
    # the same graph, the same kernels: equal within 1e-6 of the latents' range
    assert float(np.abs(shared - separate).max()) <= 1e-6 * float(np.abs(separate).max())


def test_separate_weights_and_other_graphs_load_per_graph(tiny_export: Path, tmp_path: Path) -> None:
    pipe = TGatePipeline.from_export(tiny_export, weights="separate")
    assert all(isinstance(e, OrtEngine) for e in pipe.engines.values())
    with pytest.raises(ValueError, match="weights must be one of shared, separate"):
        TGatePipeline.from_export(tiny_export, weights="twice")
    # an export whose base graph lacks the structure the gated graph needs still loads, a session per variant
    root = tmp_path / "export"
    shutil.copytree(tiny_export, root)
    manifest = json.loads((root / "manifest.json").read_text())
    base = root / manifest["graphs"][mf.PREGATE]["file"]
    model = onnx.load(str(base), load_external_data=False)
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and mf.PROMPT_EMBEDS in n.input)
    concat.input[:] = list(reversed(concat.input))  # no longer [negative, prompt]: the CFG batch is not found
    onnx.save_model(model, str(base))
    manifest["graphs"][mf.PREGATE]["files"][f"unet/{mf.PREGATE}.onnx"] = hashlib.sha256(base.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="re-export to share them"):
        pipe = TGatePipeline.from_export(root)
    assert all(isinstance(e, OrtEngine) for e in pipe.engines.values())


MEASURE = r"""
import json, re, sys
from pathlib import Path
from tgate_trt import manifest as mf
from tgate_trt.export.onnx_io import random_feeds
from tgate_trt.runtime.engine import OrtEngine
from tgate_trt.runtime.ort_gated import gated_views

def rss(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

root, mode = Path(sys.argv[1]), sys.argv[2]
manifest = mf.Manifest.load(root)
keys = [mf.PREGATE] if mode == "one" else list(manifest.variants)
base = rss("VmRSS")
if mode == "shared":
    engines = list(gated_views(root, manifest, ["CPUExecutionProvider"], 2, "shared").values())
else:
    engines = [OrtEngine(k, root / manifest.graphs[k].file, manifest.graphs[k], ["CPUExecutionProvider"], 2, "shared")
               for k in keys]
for engine in engines:
    engine(random_feeds(manifest, engine.name, 8, 8, 1))
print(json.dumps({"peak": rss("VmHWM") - base}))
"""


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny's pipeline with its UNet widened to 54M parameters (216 MB in fp32), saved and exported for real."""
    import diffusers
    import torch

    from tgate_trt.export.exporter import ExportRequest, run_export
    from tgate_trt.families import build_tiny
    from tgate_trt.families.presets import ARCHITECTURES

    folder = tmp_path_factory.mktemp("wide")
    pipe = build_tiny()
    config = {**ARCHITECTURES["tiny"]["unet"], "block_out_channels": [192, 384], "layers_per_block": 2}
    torch.manual_seed(0)
    pipe.unet = diffusers.UNet2DConditionModel(**{**config, "norm_num_groups": 32}).eval()
    pipe.save_pretrained(folder / "model")
    run_export(ExportRequest(str(folder / "model"), folder / "export"))
    return folder / "export"


def _peak(root: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root), mode], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


@pytest.mark.slow
def test_two_variants_hold_the_weights_once_in_memory(wide_export: Path) -> None:
    weights = (wide_export / mf.UNET / "model.onnx_data").stat().st_size
    assert weights > 200e6
    one, shared, separate = (_peak(wide_export, mode) for mode in ("one", "shared", "separate"))
    print(f"\npeak RSS over baseline: one variant {one / 2**20:.0f} MiB, two sharing {shared / 2**20:.0f} MiB, "
          f"two separate {separate / 2**20:.0f} MiB (weights {weights / 2**20:.0f} MiB)")  # fmt: skip
    assert separate > one + 0.6 * weights  # the measurement sees a second copy when there is one
    assert shared < one + 0.3 * weights  # and there is none when the variants share
