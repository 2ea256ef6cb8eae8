"""MAC counts read off the ONNX graphs against an independent count from PyTorch forward hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from tgate_trt import manifest as mf
from tgate_trt.export.tgate import PostGateUNet, PreGateUNet
from tgate_trt.families import build_tiny
from tgate_trt.tools.macs import main, model_macs, pipeline_macs


def _torch_macs(module: torch.nn.Module, args: tuple) -> dict[str, int]:
    """Conv / Linear MACs from output sizes, attention from Q/K/V shapes, counted as the modules run."""
    counts = {"conv": 0, "linear": 0, "attention": 0}
    hooks = []

    def conv_hook(m, inp, out):
        counts["conv"] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        counts["linear"] += out.numel() * m.in_features

    def attn_hook(m, args, kwargs, out):
        state = getattr(m.processor, "state", None)
        if state is not None and state.mode == "replay":  # a replayed attn2 computes nothing
            return
        hidden = args[0]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        b, lq, _ = hidden.shape
        inner = m.to_q.out_features
        counts["attention"] += 2 * b * lq * context.shape[1] * inner  # QK^T and attn x V

    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attn_hook, with_kwargs=True))
    with torch.no_grad():
        module(*args)
    for h in hooks:
        h.remove()
    return counts


def test_graph_macs_equal_pytorch_count(tiny_export: Path) -> None:
    run = pipeline_macs(tiny_export, steps=25, gate_step=10, batch=2, height=64, width=96)
    unet = build_tiny().unet
    pre, post = PreGateUNet(unet), PostGateUNet(unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    ts, gs = torch.tensor([10.0]), torch.tensor([7.5])
    want_pre = _torch_macs(pre, (x, ts, emb, emb, gs))
    with torch.no_grad():
        caches = pre(x, ts, emb, emb, gs)[1:]
    want_post = _torch_macs(post, (x, ts, *caches))
    for key, want in ((mf.PREGATE, want_pre), (mf.POSTGATE, want_post)):
        got = run.per_call[key]
        assert (got.conv, got.linear, got.attention) == (want["conv"], want["linear"], want["attention"]), key


def test_run_totals_and_bound(tiny_export: Path) -> None:
    run = pipeline_macs(tiny_export, steps=20, gate_step=5)
    pre, post = run.per_call[mf.PREGATE].total, run.per_call[mf.POSTGATE].total
    assert post < pre / 2  # half the batch and no cross-attention
    unet = (mf.PREGATE, mf.POSTGATE)
    assert run.total(5, unet) == 5 * pre + 15 * post and run.total(20, unet) == 20 * pre
    assert abs(run.bound - 20 / (5 + 15 * post / pre)) < 1e-12
    assert run.total(5) == run.total(5, unet) + run.per_call[mf.TEXT_ENCODER].total + run.per_call[mf.VAE_DECODER].total


def test_cli_prints_table_and_writes_json(tiny_export: Path, tmp_path: Path, capsys) -> None:
    import json

    assert main([str(tiny_export), "--steps", "10", "--gate", "4", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "speed-up bound" in out and "unet_postgate" in out
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["steps"] == 10 and data["gate_step"] == 4 and data["speedup_bound"] > 1
    assert main([str(tiny_export), "--gate", "0"]) == 2
    assert main([str(tiny_export), "--height", "70"]) == 2
    assert main([str(tiny_export), "--batch", "0", "--json", str(tmp_path / "b.json")]) == 2  # was a traceback
    assert main([str(tiny_export), "--height", "4096", "--width", "4096"]) == 2  # over tiny's cap ...
    assert "--max-pixels" in capsys.readouterr().err
    argv = [str(tiny_export), "--height", "4096", "--width", "4096", "--max-pixels", str(4096 * 4096)]
    assert main([*argv, "--json", str(tmp_path / "big.json")]) == 0  # ... which --max-pixels raises
    assert json.loads((tmp_path / "big.json").read_text())["height"] == 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "m.json"]  # no temp file, no refused JSON


# --- V2: per variant, per plan; the PyTorch (meta) count against the graphs ------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_meta_module_count_equals_every_graph(v2_export, name: str) -> None:
    """--model counts the PyTorch modules on the meta device: equal to the ONNX count, graph by graph (text
    encoders, each of the five V2 UNet variants with its replayed inputs cut, VAE decoder), at two sizes."""
    export = v2_export(name)
    for batch, size in ((1, {}), (2, {"height": 64, "width": 96})):
        graphs = pipeline_macs(export, batch=batch, **size)
        torch_count = model_macs(name, batch=batch, height=graphs.height, width=graphs.width, schedule="v2")
        assert set(torch_count.per_call) == set(graphs.per_call) and len(graphs.per_call) >= 7
        for key, want in graphs.per_call.items():
            assert torch_count.per_call[key] == want, (name, batch, key)


def test_v2_plan_sums_each_step_s_variant(v2_export) -> None:
    """The authors' worked example (25 steps, 10 / 5 / 1 / 2): attn1 captured at 2 and 5 and replayed between,
    the gate step captures both kinds, attn2 replayed after it; the run is the sum of each step's graph."""
    run = pipeline_macs(v2_export("tiny"), steps=25, gate_step=10)
    assert (run.sp_interval, run.fi_interval, run.warm_up, run.schedule) == (5, 1, 2, "v2")  # the export's
    keys = run.unet_keys()
    assert (
        keys
        == ["unet_c1"] * 3 + ["unet_r1"] * 2 + ["unet_c1"] + ["unet_r1"] * 3 + ["unet_gate"] + ["unet_post_r2_c1"] * 15
    )
    unet = run.unet_graphs
    assert run.total(None, unet) == sum(run.per_call[k].total for k in keys)
    assert run.baseline(unet) == 25 * run.per_call["unet_c1"].total
    pre = run.per_call["unet_c1"].total
    assert run.per_call["unet_r1"].total < pre and run.per_call["unet_gate"].total == pre  # captures are free
    assert run.per_call["unet_post_r12"].total < run.per_call["unet_post_r2_c1"].total
    fi2 = pipeline_macs(v2_export("tiny"), fi_interval=2)
    assert fi2.calls()["unet_post_r12"] == 7 and fi2.bound > run.bound  # attn1 replayed every other step after
    v1 = pipeline_macs(v2_export("tiny"), schedule="v1")  # V1 runs on V2 graphs at V1's cost
    data = v1.to_dict()
    assert (v1.sp_interval, v1.fi_interval, v1.warm_up) == (1, 1, 0) and data["calls"]["unet_r1"] == 0
    assert v1.bound < run.bound and data["plan"].count("unet_post_r2_c1") == 15


def test_v1_on_v2_graphs_costs_what_v1_graphs_do(tiny_export: Path, v2_export) -> None:
    a = pipeline_macs(tiny_export, height=64, width=96)
    b = pipeline_macs(v2_export("tiny"), schedule="v1", height=64, width=96)
    assert a.total() == b.total() and a.baseline() == b.baseline() and a.ratio == b.ratio


def test_sd15_architecture_equals_the_counted_sd15_export() -> None:
    """The meta count of SD-1.5 at 512² equals what was read off a real SD-1.5 export's graphs
    (benchmarks/macs_sd15_512.json), graph by graph and per run."""
    import json

    stored = json.loads((Path(__file__).parents[1] / "benchmarks" / "macs_sd15_512.json").read_text())
    data = model_macs("sd15", height=512, width=512).to_dict()
    assert data["per_call"] == stored["per_call"]
    for key in ("run_total", "unet_total", "ratio_post_over_pre", "speedup_bound"):
        assert data[key] == stored[key], key


def test_cli_schedules_and_refusals(tiny_export: Path, v2_export, tmp_path: Path, capsys) -> None:
    import json

    export = v2_export("tiny")
    assert main([str(export), "--sp-interval", "3", "--json", str(tmp_path / "v2.json")]) == 0
    data = json.loads((tmp_path / "v2.json").read_text())
    assert (data["sp_interval"], data["fi_interval"], data["warm_up"]) == (3, 1, 2)  # the export's, but sp
    assert data["schedule"] == "v2" and len(data["plan"]) == 25 and "unet_r1" in capsys.readouterr().out
    assert main(["--model", "tiny", "--schedule", "v2", "--json", str(tmp_path / "m.json")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["source"] == "torch meta: tiny" and meta["run_total"]["baseline"] == data["run_total"]["baseline"]
    assert (meta["sp_interval"], meta["fi_interval"], meta["warm_up"]) == (5, 1, 2)  # the authors' defaults
    capsys.readouterr()
    refusals = [
        ([str(tiny_export), "--schedule", "v2"], "re-export with --schedule v2"),
        ([str(tiny_export), "--warm-up", "2"], "re-export with --schedule v2"),
        ([str(export), "--schedule", "v1", "--sp-interval", "5"], "--sp-interval is a V2 parameter"),
        ([str(export), "--fi-interval", "0"], "--fi-interval must be an integer in 1..1000"),
        ([str(export), "--model", "tiny"], "not both"),
        ([], "name an export folder or --model"),
        (["--model", "sd99"], "counting needs an architecture"),
        (["--model", "tiny", "--height", "72"], "multiples of 16"),
        (["--model", "tiny", "--max-pixels", "100"], "no cap"),
    ]
    for argv, message in refusals:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
