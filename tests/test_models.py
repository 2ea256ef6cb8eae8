"""The tiny variants of SD-2.1, SDXL and the guidance-free (LCM) models: two-graph export, manifest,
ORT pipeline against the PyTorch reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tgate_trt import manifest as mf
from tgate_trt.export.exporter import ExportRequest, run_export
from tgate_trt.export.reference import tgate_reference
from tgate_trt.export.tgate import cross_attention_modules
from tgate_trt.families import build_from_architecture
from tgate_trt.runtime.pipeline import TGatePipeline

PROMPTS = ["a red circle on the left", "a blue square at the top"]
# variant -> (family, cfg, added conditioning, guidance embedding, attn2 count, text encoder graphs)
VARIANTS = {
    "tiny-sd21": ("sd", True, False, None, 7, 1),
    "tiny-sdxl": ("sdxl", True, True, None, 11, 2),
    "tiny-lcm": ("lcm", False, False, 32, 7, 1),
    "tiny-lcm-sdxl": ("lcm-sdxl", False, True, 32, 11, 2),
}


def _steps(name: str) -> int:
    return 4 if "lcm" in name else 10


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_validates_and_records_the_family(model_export: Callable[[str], Path], name: str) -> None:
    family, cfg, added, embedding, n_attn2, n_text = VARIANTS[name]
    root = model_export(name)
    m = mf.Manifest.load(root)
    assert (m.model.family, m.model.cfg, m.model.added_conditioning) == (family, cfg, added)
    assert m.model.guidance_embedding == embedding and m.gate["cfg_in_graph"] is cfg
    assert m.source["preset"] == name
    assert all(row["passed"] for row in m.validation)
    assert len(m.validation) == n_text + 6  # every text encoder, then 3 graphs x 2 cases
    assert [c.module for c in m.cache_layers] == cross_attention_modules(build_from_architecture(name).unet)
    assert len(m.cache_layers) == n_attn2
    encoders = [mf.TEXT_ENCODER, mf.TEXT_ENCODER_2][:n_text]
    assert list(m.graphs) == [*encoders, mf.PREGATE, mf.POSTGATE, mf.VAE_DECODER]
    assert [e["graph"] for e in m.text_encoders] == encoders
    for key, spec in m.graphs.items():
        assert (root / spec.file).is_file() and (root / spec.file).parent.joinpath("config.json").is_file()
        assert spec.file == mf.graph_file(key, unet=key in m.variants)
    pre_inputs = [t.name for t in m.graphs[mf.PREGATE].inputs]
    post_inputs = [t.name for t in m.graphs[mf.POSTGATE].inputs]
    assert pre_inputs == [mf.SAMPLE, mf.TIMESTEP, *mf.conditioning_inputs(m.model, postgate=False)]
    assert post_inputs == [mf.SAMPLE, mf.TIMESTEP, *mf.conditioning_inputs(m.model, postgate=True), *m.cache_names]
    assert mf.PROMPT_EMBEDS not in post_inputs  # no text states after the gate
    assert (mf.NEGATIVE_PROMPT_EMBEDS in pre_inputs) is cfg and (mf.GUIDANCE_SCALE in pre_inputs) is True
    assert (mf.TEXT_EMBEDS in pre_inputs) is added
    post = onnx.load(str(root / m.graphs[mf.POSTGATE].file), load_external_data=False)
    assert not any("attn2" in i.name for i in post.graph.initializer)


def test_manifest_semantics_per_family(model_export: Callable[[str], Path]) -> None:
    sd21 = mf.Manifest.load(model_export("tiny-sd21"))
    assert sd21.model.prediction_type == "v_prediction"
    assert '"v_prediction"' in (model_export("tiny-sd21") / "scheduler" / "scheduler_config.json").read_text()
    assert sd21.defaults["steps"] == 25 and sd21.defaults["gate_step"] == 10
    sdxl = mf.Manifest.load(model_export("tiny-sdxl"))
    # After the gate the post-gate graph takes the negative branch's added conditioning (as TgateSDXLLoader).
    post_inputs = [t.name for t in sdxl.graphs[mf.POSTGATE].inputs]
    assert mf.NEGATIVE_TEXT_EMBEDS in post_inputs and mf.NEGATIVE_TIME_IDS in post_inputs
    assert mf.TEXT_EMBEDS not in post_inputs and mf.TIME_IDS not in post_inputs
    assert sdxl.text["force_zeros_for_empty_prompt"] is True and sdxl.text["time_ids"] == 6
    assert sdxl.text["hidden_size"] == 64 and sdxl.graphs[mf.PREGATE].input(mf.TIME_IDS).shape == [mf.BATCH, 6]
    assert "negative branch" in sdxl.gate["semantics"]
    lcm = mf.Manifest.load(model_export("tiny-lcm"))
    assert lcm.defaults["steps"] == 4 and lcm.defaults["gate_step"] in (1, 2)
    assert "no CFG" in lcm.gate["semantics"] and "as-is" in lcm.gate["semantics"]
    assert lcm.encoder_batch(3) == 3 and sdxl.encoder_batch(3) == 6
    # The pre-gate graph of a guidance-free model runs batch B and its caches have batch B too.
    assert lcm.graphs[mf.PREGATE].output("cache_00").shape[0] == mf.BATCH


@pytest.mark.parametrize(
    ("name", "gate", "negative"),
    [
        ("tiny-sd21", 3, None),
        ("tiny-sd21", 7, ["", "blurry"]),
        ("tiny-sdxl", 3, None),  # SDXL zeroes a missing negative prompt
        ("tiny-sdxl", 7, ["", "blurry"]),
        ("tiny-lcm", 1, None),
        ("tiny-lcm", 2, None),
        ("tiny-lcm-sdxl", 1, None),
        ("tiny-lcm-sdxl", 2, None),
    ],
)
def test_ort_pipeline_matches_reference(
    model_export: Callable[[str], Path], name: str, gate: int, negative: list[str] | None
) -> None:
    pipe = TGatePipeline.from_export(model_export(name))
    steps = _steps(name)
    ours = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, gate_step=gate, seed=5)
    ref = tgate_reference(
        build_from_architecture(name),
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        gate_step=gate,
        guidance_scale=pipe.manifest.defaults["guidance_scale"],
        generator=torch.Generator().manual_seed(5),
    )
    assert np.abs(ours.latents - ref.latents.numpy()).max() <= 1e-3
    assert np.abs(_pixels(ours.images) - _pixels(ref.images)).max() <= 2
    assert ours.calls[mf.PREGATE] == gate and ours.calls[mf.POSTGATE] == steps - gate
    assert all(ours.calls[e["graph"]] == 1 for e in pipe.manifest.text_encoders)


def test_runtime_uses_the_exports_scheduler(model_export: Callable[[str], Path]) -> None:
    """SDXL's default is its Euler scheduler, LCM's the LCM scheduler (which draws noise from the seed)."""
    sdxl = TGatePipeline.from_export(model_export("tiny-sdxl"))
    a = sdxl("a red circle", num_inference_steps=6, gate_step=3, seed=1)
    b = sdxl("a red circle", num_inference_steps=6, gate_step=3, seed=1, scheduler="euler")
    c = sdxl("a red circle", num_inference_steps=6, gate_step=3, seed=1, scheduler="ddim")
    assert np.array_equal(a.latents, b.latents) and np.abs(a.latents - c.latents).max() > 1e-3
    lcm = TGatePipeline.from_export(model_export("tiny-lcm"))
    x = lcm("a red circle", seed=1)
    assert np.array_equal(x.latents, lcm("a red circle", seed=1, scheduler="lcm").latents)
    assert np.abs(x.latents - lcm("a red circle", seed=2).latents).max() > 1e-3


def _postgate_feeds(m: mf.Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {
        mf.SAMPLE: rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        mf.TIMESTEP: np.array([500.0], np.float32),
        mf.GUIDANCE_SCALE: np.array([8.5], np.float32),
    }
    dims = {mf.BATCH: 1, **{mf.hw_dim(c.level): c.tokens(8, 8) for c in m.cache_layers}}
    for t in m.graphs[mf.POSTGATE].inputs:
        if t.name not in feeds:
            feeds[t.name] = rng.standard_normal([dims.get(d, d) for d in t.shape]).astype(np.float32)
    if mf.NEGATIVE_TIME_IDS in feeds:
        feeds[mf.NEGATIVE_TIME_IDS] = np.array([[64, 64, 0, 0, 64, 64]], np.float32)
    return {k: v for k, v in feeds.items() if k in [t.name for t in m.graphs[mf.POSTGATE].inputs]}


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("tiny-lcm", mf.GUIDANCE_SCALE, np.array([2.0], np.float32)),
        ("tiny-lcm-sdxl", mf.GUIDANCE_SCALE, np.array([2.0], np.float32)),
        ("tiny-sdxl", mf.NEGATIVE_TIME_IDS, np.array([[64, 64, 16, 0, 64, 64]], np.float32)),
        ("tiny-sdxl", mf.NEGATIVE_TEXT_EMBEDS, np.zeros((1, 32), np.float32)),
    ],
)
def test_postgate_graph_reads_its_conditioning(
    model_export: Callable[[str], Path], name: str, key: str, value: np.ndarray
) -> None:
    """SDXL's added conditioning and LCM's guidance embedding feed the time embedding after the gate."""
    pipe = TGatePipeline.from_export(model_export(name))
    post = pipe.engines[mf.POSTGATE]
    feeds = _postgate_feeds(pipe.manifest)
    base = post.numpy(post(feeds)[mf.NOISE_PRED])
    changed = post.numpy(post({**feeds, key: value})[mf.NOISE_PRED])
    assert np.abs(base - changed).max() > 1e-4


def test_guidance_free_export_refuses_a_negative_prompt(model_export: Callable[[str], Path]) -> None:
    pipe = TGatePipeline.from_export(model_export("tiny-lcm"))
    before = pipe.engines[mf.TEXT_ENCODER].calls
    with pytest.raises(ValueError, match="guidance-free .* negative_prompt has no effect"):
        pipe("a red circle", negative_prompt="blurry")
    assert pipe.engines[mf.TEXT_ENCODER].calls == before


def test_engine_profiles_follow_the_family(model_export: Callable[[str], Path]) -> None:
    from tgate_trt.engines.profiles import all_profiles

    lcm = all_profiles(mf.Manifest.load(model_export("tiny-lcm")), 2, 64, 64)
    assert lcm[mf.TEXT_ENCODER]["input_ids"][1] == (2, 77)  # prompts only: no CFG
    assert lcm[mf.PREGATE][mf.PROMPT_EMBEDS][1] == (2, 77, 32)
    sdxl = all_profiles(mf.Manifest.load(model_export("tiny-sdxl")), 2, 64, 64)
    assert sdxl[mf.TEXT_ENCODER_2]["input_ids"][1] == (4, 77)
    assert sdxl[mf.POSTGATE][mf.NEGATIVE_TEXT_EMBEDS][1] == (2, 32)
    assert sdxl[mf.POSTGATE][mf.NEGATIVE_TIME_IDS][1] == (2, 6)


def test_fp16_sdxl_keeps_the_vae_decoder_in_fp32(tmp_path: Path) -> None:
    manifest, checks = run_export(ExportRequest("tiny-sdxl", tmp_path / "fp16", dtype="fp16"))
    assert all(c.passed for c in checks)
    assert manifest.graphs[mf.PREGATE].input(mf.SAMPLE).dtype == "float16"
    assert manifest.graphs[mf.PREGATE].input(mf.TIME_IDS).dtype == "float32"
    assert manifest.graphs[mf.TEXT_ENCODER_2].output("text_embeds").dtype == "float16"
    assert manifest.graphs[mf.VAE_DECODER].input("latent_sample").dtype == "float32"
    assert manifest.latent["vae_decoder_dtype"] == "fp32"
    result = TGatePipeline.from_export(tmp_path / "fp16")("a red circle", num_inference_steps=4, gate_step=2)
    assert np.isfinite(result.latents).all()


def test_lcm_lora_shaped_folder_exports_and_matches_authors(tmp_path: Path) -> None:
    """SDXL with an LCM scheduler and no guidance embedding (how a fused LCM-LoRA checkpoint looks):
    detected as guidance-free, no guidance input at all, equal to the authors' LCM mode at guidance 1."""
    from diffusers import LCMScheduler

    def build():
        pipe = build_from_architecture("tiny-sdxl")
        pipe.scheduler = LCMScheduler.from_config(build_from_architecture("tiny-lcm").scheduler.config)
        return pipe

    build().save_pretrained(tmp_path / "folder")
    manifest, _ = run_export(ExportRequest(str(tmp_path / "folder"), tmp_path / "out"))
    assert (manifest.model.family, manifest.model.guidance_embedding, manifest.source["kind"]) == (
        "lcm-sdxl",
        None,
        "folder",
    )
    assert mf.GUIDANCE_SCALE not in [t.name for t in manifest.graphs[mf.PREGATE].inputs]
    ours = TGatePipeline.from_export(tmp_path / "out")(PROMPTS, num_inference_steps=4, gate_step=2, seed=3)
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    theirs = (
        tgate.TgateSDXLLoader(build())
        .tgate(
            PROMPTS,
            gate_step=2,
            num_inference_steps=4,
            guidance_scale=1.0,
            sp_interval=1,
            fi_interval=1,
            warm_up=0,
            lcm=True,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        )  # fmt: skip
        .images
    )
    assert np.abs(ours.latents - theirs.numpy()).max() <= 1e-3


def test_cli_exports_and_runs_a_tiny_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tgate-export --model tiny-lcm`` then ``tgate-run`` with the export's own defaults (4 steps, gate 2)."""
    from tgate_trt.export.cli import main as export_main
    from tgate_trt.runtime.cli import main as run_main

    out = tmp_path / "lcm"
    assert export_main(["--model", "tiny-lcm", "--out", str(out)]) == 0
    assert "exported tiny-lcm (lcm, fp32" in capsys.readouterr().out
    assert run_main([str(out), "a red circle", "--out", str(tmp_path / "a.png"), "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 steps, gate 2" in printed and (tmp_path / "a.png").is_file()
    assert run_main([str(out), "a red circle", "--negative", "blurry", "--out", str(tmp_path / "b.png")]) == 2
    assert "guidance-free" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["sdxl", "lcm-sd15", "lcm-sdxl"])
def test_hub_presets_fail_offline_with_a_hint(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tgate_trt.families import ModelLoadError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--random-weights"):
        resolve_model(preset)
