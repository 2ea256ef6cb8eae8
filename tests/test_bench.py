"""``tgate-bench`` on tiny: real runs of our variants, table, JSON and plot written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tgate_trt.export.quantize import quantize_export
from tgate_trt.runtime.bench import main


def test_bench_writes_table_json_and_plot(tiny_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib draws the bench plot")
    out = tmp_path / "bench"
    quantize_export(tiny_export, tmp_path / "int8")
    args = [
        "--model",
        "tiny",
        "--export",
        str(tiny_export),
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "6",
        "--gate",
        "2",
        "--runs",
        "1",
        "--variants",
        "cdeq",
        "--int8-export",
        str(tmp_path / "int8"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads((out / "bench.json").read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert by["c"]["ok"] and by["d"]["ok"]
    assert by["c"]["median"]["postgate"] == 0 and by["d"]["median"]["postgate"] > 0
    assert by["e"]["ok"], by["e"].get("error")  # optimum's pipeline on our parts + its own plain UNet
    assert by["e"]["median"]["pregate"] > 0 and by["e"]["median"]["postgate"] == 0
    assert by["e"]["median"]["text_encoder"] > 0 and by["e"]["median"]["vae_decoder"] > 0
    assert by["q"]["ok"] and by["q"]["median"]["postgate"] > 0  # the int8 copy runs the same schedule
    assert "vs (c)" in (out / "bench.md").read_text()
    assert Image.open(out / "bench.png").size[0] > 0
    assert data["meta"]["settings"]["gate"] == "2"


def test_bench_refuses_bad_input(tiny_export: Path, tmp_path: Path) -> None:
    base = ["--export", str(tiny_export), "--out", str(tmp_path)]
    assert main([*base, "--gate", "0"]) == 2
    assert main([*base, "--height", "70"]) == 2
    assert main([*base, "--variants", "xyz"]) == 2
    assert main([*base, "--variants", "q"]) == 2  # (q) without --int8-export
    assert main([*base, "--variants", "q", "--int8-export", str(tiny_export)]) == 2  # not an int8 copy
    assert main(["--export", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
