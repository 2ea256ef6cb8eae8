"""MAC counts read off the ONNX graphs against an independent count from PyTorch forward hooks."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention

from tgate_trt import manifest as mf
from tgate_trt.export.macs import main, pipeline_macs
from tgate_trt.export.models import build_tiny
from tgate_trt.export.tgate import PostGateUNet, PreGateUNet


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
    assert (
        run.total(5)
        == run.total(5, unet) + run.per_call[mf.TEXT_ENCODER].total + run.per_call[mf.VAE_DECODER].total
    )


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
    assert main([str(tiny_export), "--height", "256", "--width", "256"]) == 2  # over tiny's cap ...
    assert "--max-pixels" in capsys.readouterr().err
    argv = [str(tiny_export), "--height", "256", "--width", "256", "--max-pixels", str(256 * 256)]
    assert main([*argv, "--json", str(tmp_path / "big.json")]) == 0  # ... which --max-pixels raises
    assert json.loads((tmp_path / "big.json").read_text())["height"] == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "m.json"]  # no temp file, no refused JSON
