"""``tgate-bench`` on tiny: real runs of our variants, table, JSON and plot written."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tgate_trt.engines import cli as build_cli
from tgate_trt.export.quantize import quantize_export
from tgate_trt.tools.bench import choose_variants, main, markdown, parse_variants, targets

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "6", "--gate", "2", "--runs", "1"]


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
    # (d)'s post-/pre-gate step time beside r, counted off tiny's graphs (no (h) row: no speed targets)
    step = data["targets"]["step_ratios"]["d"]
    assert step["step_time_ratio"] > 0 and 0.3 < step["mac_ratio"] < 0.6 and "counted" in step["mac_ratio_source"]
    assert data["targets"]["speedups"] == [] and "## Targets" in (out / "bench.md").read_text()


def test_bench_runs_bf16_torch_and_openvino_peer(tiny_export: Path, tmp_path: Path) -> None:
    """(b16): the authors' tgate under bf16 autocast; (f): optimum-intel's OpenVINO pipeline, exported here."""
    pytest.importorskip("openvino", reason="variant (f) runs on OpenVINO")
    pytest.importorskip("optimum.intel", reason="variant (f) is optimum-intel's pipeline")
    pytest.importorskip("tgate", reason="variant (b16) is the authors' tgate package")
    out = tmp_path / "bench"
    args = [*TINY, "--export", str(tiny_export), "--variants", "b16,f", "--ov-precision", "f32", "--out", str(out)]
    assert main([*args, "--optimum-intel-dir", str(tmp_path / "ov")]) == 0
    by = {r["variant"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert by["b16"]["ok"], by["b16"].get("error")
    assert by["b16"]["median"]["total"] > 0 and by["b16"]["median"]["postgate"] > 0  # gated at 2 of 6
    assert by["f"]["ok"], by["f"].get("error")
    f = by["f"]["median"]
    assert f["total"] > 0 and f["text_encoder"] > 0 and f["pregate"] > 0 and f["vae_decoder"] > 0
    assert f["postgate"] == 0 and by["f"]["precision"] == "f32"
    assert (tmp_path / "ov" / "source.json").is_file()  # kept for the next sitting
    assert "(f) optimum-intel OVStableDiffusionPipeline, f32" in (out / "bench.md").read_text()


def test_bench_runs_ours_on_openvino(tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(g), (h), (h-int8w) on builds made by tgate-build, beside (c): rows, Targets and refusals."""
    pytest.importorskip("openvino", reason="variants (g), (h), (h-int8w) run on OpenVINO")
    pytest.importorskip("nncf", reason="the int8w build compresses weights with NNCF")
    monkeypatch.setenv("TGATE_OV_CACHE", str(tmp_path / "ov-cache"))  # inherited by the rows' processes
    export = tmp_path / "tiny"
    shutil.copytree(tiny_export, export)
    for precision, name in (("f32", "openvino"), ("int8w", "openvino-int8w")):
        argv = [str(export), "--target", "openvino", "--precision", precision, "--out", str(export / name)]
        assert build_cli.main(argv) == 0
    ns = argparse.Namespace(
        variants=None, export=export, ov_precision="f32", ov_build="openvino", ov_int8w_build="openvino-int8w"
    )
    assert choose_variants(argparse.Namespace(**vars(ns), int8_export=None))[7:] == ["f", "g", "h", "h-int8w"]
    base = [*TINY, "--export", str(export), "--out", str(tmp_path / "bench")]
    assert main([*base, "--variants", "h", "--ov-precision", "bf16"]) == 2  # the build is f32
    assert main([*base, "--variants", "h-int8w", "--ov-int8w-build", "openvino"]) == 2  # not an int8w build
    assert main([*base, "--variants", "c,g,h,h-int8w", "--ov-precision", "f32"]) == 0
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    by = {r["variant"]: r for r in data["results"]}
    for kind in ("c", "g", "h", "h-int8w"):
        assert by[kind]["ok"], by[kind].get("error")
    assert by["g"]["median"]["postgate"] == 0 and by["h"]["median"]["postgate"] > 0
    assert by["h-int8w"]["median"]["postgate"] > 0 and by["h-int8w"]["precision"] == "int8w"
    assert [s["vs"] for s in data["targets"]["speedups"]] == ["c"]  # only the rows that ran
    assert data["targets"]["step_ratios"]["h"]["step_time_ratio"] > 0


def test_variant_names_parse_in_both_forms() -> None:
    assert parse_variants("cdeq") == ["c", "d", "e", "q"]  # the older letters-only form
    assert parse_variants("a,b16, f,h-int8w") == ["a", "b16", "f", "h-int8w"]
    assert parse_variants("b16") == ["b16"] and parse_variants("h") == ["h"]
    for bad in ("b16f", "c,x", "", "h-int8"):
        with pytest.raises(ValueError):
            parse_variants(bad)


def test_default_set_leaves_out_openvino_rows_without_a_build(
    tiny_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = argparse.Namespace(
        variants=None, export=tiny_export, ov_precision="f32", ov_build="openvino", ov_int8w_build="x", int8_export=None
    )
    assert choose_variants(ns) == ["a", "b", "b16", "c", "d", "d-sep", "e"]
    assert "leaving out f,g,h" in capsys.readouterr().err


def test_targets_set_h_against_its_peers() -> None:
    """The Targets section's arithmetic, on rows shaped as the workers report them."""

    def row(kind: str, total: float, pre: float = 0.0, post: float = 0.0) -> dict:
        median = {"text_encoder": 0.0, "pregate": pre, "postgate": post, "vae_decoder": 0.0, "total": total}
        return {"variant": kind, "ok": True, "median": median, "peak_rss_gib": 1.0}

    results = [row("b16", 3.0), row("c", 8.0), row("f", 2.0), row("h", 2.0, pre=1.0, post=0.75)]
    ns = argparse.Namespace(steps=25, gate=10, mac_ratio=0.5)
    goals = targets(results, ns)
    assert [(s["vs"], round(s["speedup"], 2), s["met"]) for s in goals["speedups"]] == [
        ("f", 1.0, False),
        ("b16", 1.5, True),
        ("c", 4.0, True),
    ]
    step = goals["step_ratios"]["h"]  # (0.75 / 15) / (1.0 / 10) = 0.5 = r
    assert step["step_time_ratio"] == pytest.approx(0.5) and step["within_5pct"]
    table = markdown(results, goals)
    assert "| (h) vs (f) | 1.00x | >= 1.35x | missed |" in table and "| (h) | 0.5000 | 0.5000 | yes |" in table


def test_bench_refuses_bad_input(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--export", str(tiny_export), "--height", "64", "--width", "64", "--out", str(tmp_path)]
    assert main([*base, "--gate", "0"]) == 2
    assert main([*base, "--height", "70"]) == 2
    assert main([*base, "--height", "4096", "--width", "4096"]) == 2  # over tiny's pixel cap ...
    assert "--max-pixels" in capsys.readouterr().err  # ... which --max-pixels raises
    assert main([*base, "--variants", "xyz"]) == 2
    assert main([*base, "--variants", "c,nope"]) == 2
    capsys.readouterr()
    for kind in ("g", "h", "h-int8w"):  # no OpenVINO build in this export: say how to make one
        assert main([*base, "--variants", f"c,{kind}", "--ov-precision", "f32"]) == 2
        err = capsys.readouterr().err
        assert "tgate-build" in err and "--target openvino" in err and len(err.strip().splitlines()) == 1
    assert "--precision int8w" in (main([*base, "--variants", "h-int8w"]), capsys.readouterr().err)[1]
    assert main([*base, "--variants", "q"]) == 2  # (q) without --int8-export
    assert main([*base, "--variants", "q", "--int8-export", str(tiny_export)]) == 2  # not an int8 copy
    assert main(["--export", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []  # every refusal came before anything was written


def test_report_files_replace_only_their_own(tmp_path: Path) -> None:
    """--out is shared: an earlier report is replaced only with --force, and only its own files."""
    from tgate_trt.contract.errors import OutputError
    from tgate_trt.tools.bench_report import ReportFiles, json_safe, write_json

    out = tmp_path / "bench"
    names = ("bench.json", "bench.md")

    def publish(force: bool, text: str) -> None:
        with ReportFiles(out, names, "tgate-bench", force=force, report_keys=("results",)) as stage:
            write_json(stage / "bench.json", {"results": [text]})
            (stage / "bench.md").write_text(text)

    publish(False, "first")
    (out / "earlier").mkdir()  # another sitting kept beside the report
    with pytest.raises(OutputError, match="already holds bench.json, bench.md"):
        publish(False, "second")
    publish(True, "second")
    assert (out / "bench.md").read_text() == "second" and (out / "earlier").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "earlier"]  # no lock, no stage
    with pytest.raises(RuntimeError, match="boom"), ReportFiles(out, names, "tgate-bench", force=True) as stage:
        (stage / "bench.md").write_text("half")
        raise RuntimeError("boom")
    assert (out / "bench.md").read_text() == "second"  # a failed run changes nothing ...
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "earlier"]  # ... and leaves nothing
    (out / ".tgate-bench.tmp-killed").mkdir()  # a killed run's stage: the next writer removes it
    publish(True, "third")
    assert not (out / ".tgate-bench.tmp-killed").exists()
    (out / "bench.json").write_text("{}")  # not a report of ours: --force won't replace it
    with pytest.raises(OutputError, match="no bench.json of tgate-bench"):
        publish(True, "fourth")
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"r": float("nan")})  # NaN is not JSON: refused, never written
    assert json_safe({"r": [float("nan"), 1.0, float("inf")]}) == {"r": [None, 1.0, None]}
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError), ReportFiles(fresh, names, "tgate-bench"):
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists()  # the folders it made are removed with it


# --- T-GATE V2 rows ------------------------------------------------------------------------------------------
V2_SCHEDULE = ["--steps", "8", "--gate", "5", "--sp-interval", "2", "--fi-interval", "2", "--warm-up", "1"]


def test_bench_v2_rows_beside_the_authors_v2(
    tiny_export: Path, v2_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sitting: the authors' package in V2 (fp32, bf16 autocast) and ours in V2 on ORT and OpenVINO, with
    V1's (d) on the V1 export beside them. 8 steps, gate 5, 2 / 2 / 1 uses all five V2 graph variants."""
    pytest.importorskip("tgate", reason="variants (b-v2), (b16-v2) are the authors' tgate package")
    pytest.importorskip("openvino", reason="variant (h-v2) runs on OpenVINO")
    monkeypatch.setenv("TGATE_OV_CACHE", str(tmp_path / "ov-cache"))
    v2 = tmp_path / "tiny-v2"
    shutil.copytree(v2_export("tiny"), v2)
    assert build_cli.main([str(v2), "--target", "openvino", "--precision", "f32", "--out", str(v2 / "openvino")]) == 0
    out = tmp_path / "bench"
    args = ["--model", "tiny", "--export", str(tiny_export), "--v2-export", str(v2), "--height", "64", "--width", "64"]
    args += [*V2_SCHEDULE, "--runs", "1", "--ov-precision", "f32", "--out", str(out)]
    assert main([*args, "--variants", "b-v2,b16-v2,c,d,d-v2,h-v2"]) == 0
    data = json.loads((out / "bench.json").read_text())
    by = {r["variant"]: r for r in data["results"]}
    for kind in ("b-v2", "b16-v2", "c", "d", "d-v2", "h-v2"):
        assert by[kind]["ok"], (kind, by[kind].get("error"))
    for kind in ("b-v2", "b16-v2", "d", "d-v2", "h-v2"):  # gated at 5 of 8
        assert by[kind]["median"]["pregate"] > 0 and by[kind]["median"]["postgate"] > 0, kind
    assert by["c"]["median"]["postgate"] == 0 and by["h-v2"]["precision"] == "f32"
    v2_goals = data["targets"]["v2"]
    assert [v2_goals[k] for k in ("sp_interval", "fi_interval", "warm_up", "gate_step")] == [2, 2, 1, 5]
    pairs = [(p["faster"], p["than"]) for p in v2_goals["pairs"]]
    assert pairs == [("d-v2", "b-v2"), ("h-v2", "b-v2"), ("h-v2", "b16-v2"), ("d-v2", "d")]
    step = data["targets"]["step_ratios"]["d-v2"]  # r of the V2 plan, counted off the V2 export's graphs
    assert "V2 plan" in step["mac_ratio_source"] and 0 < step["mac_ratio"] < 1
    assert step["mac_ratio"] != data["targets"]["step_ratios"]["d"]["mac_ratio"]
    md = (out / "bench.md").read_text()
    assert "## V2" in md and "| (d-v2) ours ORT, T-GATE V2 |" in md and "(h-v2) vs (b16-v2)" in md
    assert data["meta"]["settings"]["v2_export"] == str(v2)


def test_bench_v2_refusals(tiny_export: Path, v2_export, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "tiny", "--export", str(tiny_export), "--height", "64", "--width", "64", "--out", str(tmp_path)]
    cases = [
        (["--variants", "c,d-v2"], "needs a --schedule v2 export"),
        (["--variants", "d-v2", "--v2-export", str(tiny_export)], "is a v1 export"),
        (["--variants", "d-v2", "--sp-interval", "0"], "--sp-interval must be an integer in 1..1000"),
        (["--variants", "d-v2", "--warm-up", "-1"], "--warm-up must be an integer in 0..1000"),
        (["--variants", "h-v2", "--v2-export", str(v2_export("tiny")), "--ov-precision", "f32"], "tgate-build"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert list(tmp_path.iterdir()) == []
    ns = argparse.Namespace(
        variants=None, export=tiny_export, v2_export=v2_export("tiny"), ov_precision="f32", ov_build="openvino",
        ov_int8w_build="openvino-int8w", int8_export=None,
    )  # fmt: skip
    names = choose_variants(ns)  # a V2 export: its rows join the default set; (h-v2) has no build here
    assert names[:7] == ["a", "b", "b16", "c", "d", "d-sep", "e"]
    assert names[-4:] == ["b-v2", "b16-v2", "d-v2", "d-sep-v2"]
    assert "leaving out h-v2" in capsys.readouterr().err


def test_v2_pairs_arithmetic() -> None:
    def row(kind: str, total: float) -> dict:
        median = {"text_encoder": 0.0, "pregate": 0.0, "postgate": 0.0, "vae_decoder": 0.0, "total": total}
        return {"variant": kind, "ok": True, "median": median, "peak_rss_gib": 1.0}

    results = [row("b-v2", 6.0), row("b16-v2", 4.0), row("h", 3.0), row("h-v2", 2.0)]
    ns = argparse.Namespace(steps=25, gate=10, mac_ratio=0.5, sp_interval=5, fi_interval=1, warm_up=2)
    goals = targets(results, ns)
    got = [(p["faster"], p["than"], p["speedup"]) for p in goals["v2"]["pairs"]]
    assert got == [("h-v2", "b-v2", 3.0), ("h-v2", "b16-v2", 2.0), ("h-v2", "h", 1.5)]
    table = markdown(results, goals)
    assert "| (h-v2) vs (b-v2) | 3.00x |" in table and "sp_interval 5, fi_interval 1, warm_up 2" in table
    assert "## Targets" not in table  # no (h) target peer ran, no step ratio: only the V2 section
