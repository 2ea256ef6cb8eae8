"""The two-graph export of ``tiny``: graphs load in ORT, contract in the manifest, parity, weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tgate_trt import manifest as mf
from tgate_trt.export.exporter import ExportError, ExportRequest, run_export
from tgate_trt.export.tgate import PostGateUNet, PreGateUNet, cross_attention_modules
from tgate_trt.families import build_tiny


def _session(root: Path, key: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(_graph(root, key)), providers=["CPUExecutionProvider"])


def _graph(root: Path, key: str) -> Path:
    return root / mf.Manifest.load(root, verify=False).graphs[key].file


def test_every_graph_loads_in_onnxruntime(tiny_export: Path) -> None:
    manifest = mf.Manifest.load(tiny_export)
    for key in mf.GRAPH_KEYS:
        sess = _session(tiny_export, key)
        assert [i.name for i in sess.get_inputs()] == [t.name for t in manifest.graphs[key].inputs]
        assert [o.name for o in sess.get_outputs()] == [t.name for t in manifest.graphs[key].outputs]


def test_optimum_folder_layout(tiny_export: Path) -> None:
    for key in (mf.TEXT_ENCODER, mf.VAE_DECODER):
        assert (tiny_export / key / "model.onnx").is_file()
        assert (tiny_export / key / "config.json").is_file()
    # the UNet variants side by side in unet/, sharing one weights file
    for key in (mf.PREGATE, mf.POSTGATE):
        assert (tiny_export / mf.UNET / f"{key}.onnx").is_file()
    assert (tiny_export / mf.UNET / "model.onnx_data").is_file() and (tiny_export / mf.UNET / "config.json").is_file()
    assert (tiny_export / "tokenizer" / "vocab.json").is_file()
    assert (tiny_export / "scheduler" / "scheduler_config.json").is_file()


def test_postgate_inputs_have_no_text_and_no_attn2_weights(tiny_export: Path) -> None:
    manifest = mf.Manifest.load(tiny_export)
    post = onnx.load(str(_graph(tiny_export, mf.POSTGATE)), load_external_data=False)
    pre = onnx.load(str(_graph(tiny_export, mf.PREGATE)), load_external_data=False)
    names = [i.name for i in post.graph.input]
    assert names == [mf.SAMPLE, mf.TIMESTEP, *manifest.cache_names]
    assert "encoder_hidden_states" not in names and mf.PROMPT_EMBEDS not in names
    assert any("attn2" in i.name for i in pre.graph.initializer)
    assert not any("attn2" in i.name for i in post.graph.initializer)
    assert not any("attn2" in n.name for n in post.graph.node)
    pre_names = [i.name for i in pre.graph.input]
    assert pre_names == [
        mf.SAMPLE,
        mf.TIMESTEP,
        mf.PROMPT_EMBEDS,
        mf.NEGATIVE_PROMPT_EMBEDS,
        mf.GUIDANCE_SCALE,
    ]
    assert [o.name for o in pre.graph.output] == [mf.NOISE_PRED, *manifest.cache_names]


def test_postgate_drops_exactly_the_cross_attention_weights(tiny_export: Path) -> None:
    """pre - post == every attn2 weight + the norm2 LayerNorm that only feeds attn2 (dead without it)."""
    unet = build_tiny().unet
    modules = dict(unet.named_modules())
    attn2 = cross_attention_modules(unet)
    n_attn2 = sum(p.numel() for n in attn2 for p in modules[n].parameters())
    n_norm2 = sum(p.numel() for n in attn2 for p in modules[n.rsplit(".", 1)[0] + ".norm2"].parameters())
    manifest = mf.Manifest.load(tiny_export)
    pre, post = manifest.graphs[mf.PREGATE].parameters, manifest.graphs[mf.POSTGATE].parameters
    assert pre - post == n_attn2 + n_norm2
    total = sum(p.numel() for p in unet.parameters())
    assert total <= pre < total * 1.01  # the graph holds the UNet's weights (plus a few constants)


def test_manifest_records_the_contract(tiny_export: Path) -> None:
    data = json.loads((tiny_export / mf.MANIFEST_NAME).read_text())
    m = mf.Manifest.from_dict(data)
    assert m.source["preset"] == "tiny" and m.dtype == "fp32" and m.opset == 18
    assert [c.module for c in m.cache_layers] == cross_attention_modules(build_tiny().unet)
    assert [c.level for c in m.cache_layers] == [1, 2, 2, 2, 2, 1, 1]
    assert [c.channels for c in m.cache_layers] == [32, 64, 64, 64, 64, 32, 32]
    pre = m.graphs[mf.PREGATE]
    assert pre.input(mf.SAMPLE).shape == [mf.BATCH, 4, mf.LATENT_H, mf.LATENT_W]
    assert pre.output("cache_01").shape == [mf.BATCH, mf.hw_dim(2), 64]
    assert m.graphs[mf.POSTGATE].input("cache_00").dtype == "float32"
    assert "memory" in m.defaults  # the measured fit behind the pixel cap (tests/test_memory_budget.py)
    assert {k: v for k, v in m.defaults.items() if k != "memory"} == {
        "steps": 25,
        "gate_step": 10,
        "guidance_scale": 7.5,
        "height": 64,
        "width": 64,
        "max_pixels": 4 * 64 * 64,
        "sp_interval": 1,
        "fi_interval": 1,
        "warm_up": 0,
    }
    assert m.schedule == "v1" and list(m.variants) == [mf.PREGATE, mf.POSTGATE]
    assert m.gate["cfg_in_graph"] is True and "gate_step" in m.gate["semantics"]
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(m.tools)
    assert all(row["passed"] for row in m.validation) and len(m.validation) == 7
    for g in m.graphs.values():
        assert all(len(h) == 64 for h in g.files.values())


def test_tampered_graph_is_refused_by_hash(tiny_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    mf.Manifest.load(copy)  # intact copy verifies
    target = copy / mf.UNET / f"{mf.POSTGATE}.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(mf.ManifestError, match="unet/unet_postgate.onnx does not match its sha256"):
        mf.Manifest.load(copy)
    target.unlink()
    with pytest.raises(mf.ManifestError, match="is missing"):
        mf.Manifest.load(copy)


def test_graphs_match_pytorch_at_a_new_shape(tiny_export: Path) -> None:
    """Parity outside the export's own validation: batch 3, non-square 48x112 latent grid."""
    pipe = build_tiny()
    pre, post = PreGateUNet(pipe.unet), PostGateUNet(pipe.unet)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, 14, generator=g)
    pe, ne = torch.randn(3, 77, 32, generator=g), torch.randn(3, 77, 32, generator=g)
    ts, gs = torch.tensor([801.0]), torch.tensor([5.0])
    with torch.no_grad():
        ref = pre(x, ts, pe, ne, gs)
        ref_post = post(x, ts, *ref[1:])
    feeds = {
        "sample": x,
        "timestep": ts,
        "prompt_embeds": pe,
        "negative_prompt_embeds": ne,
        "guidance_scale": gs,
    }
    got = _session(tiny_export, mf.PREGATE).run(None, {k: v.numpy() for k, v in feeds.items()})
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    post_feeds = {"sample": x.numpy(), "timestep": ts.numpy()}
    post_feeds.update({mf.cache_name(i): c.numpy() for i, c in enumerate(ref[1:])})
    got_post = _session(tiny_export, mf.POSTGATE).run(None, post_feeds)[0]
    np.testing.assert_allclose(got_post, ref_post.numpy(), atol=1e-4, rtol=1e-4)


def test_fp16_export_validates(tmp_path: Path) -> None:
    manifest, checks = run_export(ExportRequest("tiny", tmp_path / "fp16", dtype="fp16", opset=19))
    assert all(c.passed for c in checks)
    assert manifest.dtype == "fp16" and manifest.opset == 19
    assert manifest.graphs[mf.PREGATE].input(mf.SAMPLE).dtype == "float16"
    assert manifest.graphs[mf.PREGATE].input(mf.TIMESTEP).dtype == "float32"
    assert manifest.graphs[mf.POSTGATE].input("cache_00").dtype == "float16"


def test_failed_validation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tgate_trt.export import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", (0.0, 0.0))  # no graph can be that exact
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match="validation failed"):
        run_export(ExportRequest("tiny", out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # temp folder removed too


def test_external_data_is_one_file_and_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs above 2 GB go to one external-data file; forced here on tiny to exercise the path. The UNet
    variants always read theirs from the one shared file."""
    from tgate_trt.export import onnx_io

    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    manifest, _ = run_export(ExportRequest("tiny", tmp_path / "ext"))
    assert set(manifest.graphs[mf.PREGATE].files) == {"unet/unet_pregate.onnx", "unet/model.onnx_data"}
    assert set(manifest.graphs[mf.VAE_DECODER].files) == {"vae_decoder/model.onnx", "vae_decoder/model.onnx_data"}
    sess = _session(tmp_path / "ext", mf.PREGATE)
    assert sess.get_inputs()[0].name == mf.SAMPLE


def test_local_diffusers_folder_exports(tmp_path: Path) -> None:
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "folder")
    out = tmp_path / "nested" / "out"  # missing parents are created
    manifest, checks = run_export(ExportRequest(str(tmp_path / "folder"), out))
    assert manifest.source["kind"] == "folder" and all(c.passed for c in checks)
    assert mf.Manifest.load(out).graphs.keys() == set(mf.GRAPH_KEYS)
