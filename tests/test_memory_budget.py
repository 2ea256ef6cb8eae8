"""The pixel cap from a measured memory fit (issue #14): recorded at export, derived on the machine that loads
the export, refused in one line, overridden by ``max_pixels`` / ``--max-pixels`` / Triton's parameter, and
the old rule (4x the native size) for exports without the record. Real exports, real ONNX Runtime runs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tgate_trt import manifest as mf
from tgate_trt.contract import limits
from tgate_trt.contract.errors import UsageError
from tgate_trt.export import memory

TOLERANCE = 0.15  # prediction at an unmeasured size (measured here: within 3% at 320x320 on tiny)
PROMPT = ["a red circle"]


def _load(root: Path) -> mf.Manifest:
    return mf.Manifest.load(root, verify=False)


def _largest_side(cap: int, step: int) -> int:
    """The largest square side (a multiple of ``step``) within ``cap`` pixels."""
    return math.isqrt(cap) // step * step


def _edit_manifest(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / mf.MANIFEST_NAME).read_text())
    edit(data)
    (dst / mf.MANIFEST_NAME).write_text(json.dumps(data))
    return dst


def _check(pipe: Any, side: int) -> None:
    pipe.check(PROMPT, None, 4, 2, 7.5, side, side)


def test_export_records_the_fit(tiny_export: Path) -> None:
    manifest = _load(tiny_export)
    record = manifest.defaults["memory"]
    sizes, peaks, fit = record["sizes"], record["peak_bytes"], record["fit"]
    assert len({tuple(s) for s in sizes}) == 3 and all(h == w and h % manifest.size_multiple == 0 for h, w in sizes)
    assert record["graphs"] == [mf.PREGATE, mf.VAE_DECODER]
    assert peaks == sorted(peaks) and peaks[0] > 0
    assert min(fit.values()) >= 0 and fit["c"] > 0  # self-attention's scores grow with the square of the pixels
    for (h, w), peak in zip(sizes, peaks, strict=True):
        assert memory.predict(fit, h * w) == pytest.approx(peak, rel=0.1)
    assert record["bytes_per_pixel"] == round(memory.predict(fit, 64 * 64) / (64 * 64), 1)
    assert manifest.defaults["max_pixels"] == limits.default_max_pixels(64, 64)  # for readers without the record

    # the cap on this machine: the largest pixel count whose predicted peak fits the budget
    unet = max(g.parameters for k, g in manifest.graphs.items() if k in manifest.variants)  # held once
    weights = 4 * (unet + sum(g.parameters for k, g in manifest.graphs.items() if k not in manifest.variants))
    budget = limits.MEMORY_FRACTION * limits.memory_limit() - weights - limits.MEMORY_RESERVE
    cap = manifest.max_pixels
    assert cap == max(64 * 64, limits.pixels_within(fit, budget))
    if cap > 64 * 64:
        assert memory.predict(fit, cap) <= budget < memory.predict(fit, cap + 1)
    assert manifest.pixel_cap(share=2) <= cap  # two copies on the machine: half the memory each


def test_fit_predicts_an_unmeasured_size(tiny_export: Path) -> None:
    manifest = _load(tiny_export)
    fit = manifest.defaults["memory"]["fit"]
    side = 320  # latent 40x40, past the measured 16..32
    assert [side, side] not in manifest.defaults["memory"]["sizes"]
    measured = memory.measure_peak(tiny_export, manifest, side, side)  # the same way: a fresh subprocess
    predicted = memory.predict(fit, side * side)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_derived_cap_refuses_over_and_accepts_under(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tgate_trt.runtime.cli import main as run_main
    from tgate_trt.runtime.pipeline import TGatePipeline

    pipe = TGatePipeline.from_export(tiny_export)
    cap = pipe.max_pixels
    assert cap == pipe.manifest.max_pixels
    under = _largest_side(cap, pipe.manifest.size_multiple)
    over = under + pipe.manifest.size_multiple
    _check(pipe, under)  # the checks alone: no generation at the cap
    with pytest.raises(UsageError) as refused:
        _check(pipe, over)
    message = str(refused.value)
    assert "\n" not in message and f"over this export's cap of {cap:,}" in message and "--max-pixels" in message

    png = tmp_path / "x.png"
    argv = [str(tiny_export), "a red circle", "--steps", "2", "--gate", "1", "--out", str(png)]
    assert run_main([*argv, "--height", str(over), "--width", str(over)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgate-run: error:") and "--max-pixels" in err[0]
    assert not png.exists()
    if cap < 192 * 192:
        pytest.skip(f"this machine's memory allows tiny only {cap:,} pixels")
    # over the old rule (4x 64x64 = 16,384 pixels), within the measured cap: drawn
    assert run_main([*argv, "--height", "192", "--width", "192"]) == 0
    assert png.is_file()


def test_override_wins(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tgate_trt.runtime.cli import main as run_main
    from tgate_trt.runtime.pipeline import TGatePipeline
    from tgate_trt.triton.repository import RepoOptions, generate_repository

    manifest = _load(tiny_export)
    over = _largest_side(manifest.max_pixels, manifest.size_multiple) + manifest.size_multiple
    _check(TGatePipeline.from_export(tiny_export, max_pixels=over * over), over)  # raised: accepted
    low = TGatePipeline.from_export(tiny_export, max_pixels=96 * 96)
    with pytest.raises(UsageError, match="over this export's cap of 9,216"):
        _check(low, 128)  # lowered: refused, though the measured cap allows it
    argv = [str(tiny_export), "a red circle", "--height", "128", "--width", "128", "--out", str(tmp_path / "x.png")]
    assert run_main([*argv, "--max-pixels", "9216"]) == 2
    assert "over this export's cap of 9,216" in capsys.readouterr().err

    def written_cap(name: str, **opts: Any) -> int:
        folder = generate_repository(tiny_export, tmp_path / "repo", RepoOptions(name=name, link=True, **opts))
        config = (folder / "config.pbtxt").read_text()
        found = re.search(r'key: "max_pixels"\s*value: \{\s*string_value: "(\d+)"', config)
        assert found, config
        return int(found[1])

    assert written_cap("two", instances=2) == manifest.pixel_cap(share=2)  # the host's memory split
    assert written_cap("given", instances=2, max_pixels=9216) == 9216


def test_export_without_the_record_keeps_the_rule(tiny_export: Path, tmp_path: Path) -> None:
    from tgate_trt.runtime.pipeline import TGatePipeline

    old = _edit_manifest(tiny_export, tmp_path / "old", lambda data: data["defaults"].pop("memory"))
    assert _load(old).max_pixels == limits.default_max_pixels(64, 64) == 4 * 64 * 64
    pipe = TGatePipeline.from_export(old)
    assert pipe.max_pixels == 4 * 64 * 64
    _check(pipe, 128)
    with pytest.raises(UsageError, match="over this export's cap of 16,384"):
        _check(pipe, 144)


def test_a_broken_record_is_named(tiny_export: Path, tmp_path: Path) -> None:
    def negative_c(data: dict[str, Any]) -> None:
        data["defaults"]["memory"]["fit"]["c"] = -1.0

    bad = _edit_manifest(tiny_export, tmp_path / "bad", negative_c)
    with pytest.raises(mf.ManifestError, match=r"defaults\.memory\.fit\.c"):
        _load(bad)
