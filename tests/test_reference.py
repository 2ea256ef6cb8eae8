"""The PyTorch T-GATE reference against the authors' ``tgate`` 1.0.0 package."""

from __future__ import annotations

import pytest
import torch

from tgate_trt.export.reference import tgate_reference
from tgate_trt.export.tgate import GateState, TGateAttnProcessor, cross_attention_modules, install_tgate
from tgate_trt.families import build_from_architecture, build_tiny
from tgate_trt.methods.plan import TGateParams

STEPS = 10


def _authors(prompt: list[str], gate: int, seed: int) -> torch.Tensor:
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    pipe = tgate.TgateSDLoader(build_tiny())
    return pipe.tgate(
        prompt,
        negative_prompt=[""] * len(prompt),
        gate_step=gate,
        num_inference_steps=STEPS,
        sp_interval=1,
        fi_interval=1,
        warm_up=0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images


@pytest.mark.parametrize("gate", [3, 7])
def test_reference_equals_authors_package(gate: int) -> None:
    prompt = ["a red circle on the left", "a blue square"]
    ours = tgate_reference(
        build_tiny(),
        prompt,
        negative_prompt=[""] * 2,
        num_inference_steps=STEPS,
        gate_step=gate,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    )
    theirs = _authors(prompt, gate, seed=3)
    assert (ours.pregate_calls, ours.postgate_calls) == (gate, STEPS - gate)
    assert (ours.latents - theirs).abs().max().item() <= 1e-4


def test_gates_change_the_result_and_no_gate_is_plain_cfg() -> None:
    """Gating must matter (else the equality above proves nothing), and gate >= steps is diffusers' CFG."""
    from diffusers import StableDiffusionPipeline

    def run(gate: int) -> torch.Tensor:
        out = tgate_reference(
            build_tiny(),
            "a red circle",
            num_inference_steps=STEPS,
            gate_step=gate,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return out.latents

    g3, g7, plain = run(3), run(7), run(STEPS)
    assert (g3 - g7).abs().max() > 1e-3
    pipe = build_tiny()
    assert isinstance(pipe, StableDiffusionPipeline)
    expected = pipe(
        "a red circle",
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert (plain - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("gate", [0, -1])
def test_reference_rejects_gate_below_one(gate: int) -> None:
    with pytest.raises(ValueError, match="gate_step must be an integer >= 1"):
        tgate_reference(build_tiny(), "x", num_inference_steps=4, gate_step=gate)


def test_processor_is_installed_with_set_attn_processor(tiny_pipe) -> None:
    unet = tiny_pipe.unet
    state, names = install_tgate(unet)
    assert names == cross_attention_modules(unet) and len(names) == 7
    procs = unet.attn_processors
    gated = {k for k, v in procs.items() if isinstance(v, TGateAttnProcessor)}
    assert gated == {f"{n}.processor" for n in names}  # attn2 only: attn1 is never gated
    assert all(".attn2." in k for k in gated)
    assert isinstance(state, GateState)
    again, _ = install_tgate(unet)  # idempotent: both graph wrappers share one state
    assert again is state
    # forward is untouched: the Attention class still owns it
    assert "forward" not in vars(dict(unet.named_modules())[names[0]])


def _tiny(scheduler: str):  # noqa: ANN202 (a diffusers pipeline)
    pipe = build_tiny()
    if scheduler == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    return pipe


V2_CASES = [
    (25, TGateParams.v2(), "ddim"),  # the authors' defaults: 10 / 5 / 1 / 2
    (12, TGateParams(6, 2, 2, 1), "ddim"),  # fi > 1: self-attention replayed after the gate too
    (12, TGateParams(5, 3, 3, 0), "dpm++"),  # DPM-Solver++ (second order), the gate's averaged attn1 replayed
]


def _pipe(name: str, scheduler: str):  # noqa: ANN202 (a diffusers pipeline)
    pipe = build_tiny() if name == "tiny" else build_from_architecture(name)
    if scheduler == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    return pipe


def authors_v2(
    name: str,
    scheduler: str,
    prompt: list[str],
    negative: list[str],
    steps: int,
    params: TGateParams,
    seed: int = 3,
    **kw,
) -> torch.Tensor:  # noqa: ANN003
    """The authors' pipeline, built fresh for each run (its loader rewires the modules it is given and
    keeps caches across calls)."""
    tgate = pytest.importorskip("tgate", reason="the authors' tgate package (dev extra) is not installed")
    loader = tgate.TgateSDXLLoader if "sdxl" in name else tgate.TgateSDLoader
    return (
        loader(_pipe(name, scheduler))
        .tgate(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            output_type="latent",
            gate_step=params.gate_step,
            sp_interval=params.sp_interval,
            fi_interval=params.fi_interval,
            warm_up=params.warm_up,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )
        .images
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-sd21", "tiny-sdxl"])
@pytest.mark.parametrize(("steps", "params", "scheduler"), V2_CASES)
def test_v2_reference_equals_authors_package(name: str, steps: int, params: TGateParams, scheduler: str) -> None:
    """V2 (self-attention cached on a schedule) through the exported variant modules and the sampler."""
    prompt, negative = ["a red circle on the left", "a blue square"], ["", ""]
    guidance = 5.0 if "sdxl" in name else 7.5
    ours = tgate_reference(
        _pipe(name, scheduler),
        prompt,
        negative,
        steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        params=params,
    )
    theirs = authors_v2(name, scheduler, prompt, negative, steps, params, guidance_scale=guidance)
    assert (ours.latents - theirs).abs().max().item() <= 1e-4
    v1 = authors_v2(name, scheduler, prompt, negative, steps, TGateParams.v1(params.gate_step), guidance_scale=guidance)
    assert (theirs - v1).abs().max().item() > 1e-2  # V2 differs from V1: the equality above is not V1's
    assert any("attn1" in s.replay for s in ours.steps)
    assert ours.calls == {k: v for k, v in counts_by_variant(ours.steps).items()}  # each variant as planned
    assert (ours.pregate_calls, ours.postgate_calls) == (params.gate_step, steps - params.gate_step)


def counts_by_variant(steps: list) -> dict[str, int]:  # noqa: ANN001
    from tgate_trt.methods.variants import select, variants_for

    variants = variants_for("v2", True)
    out = dict.fromkeys((v.key for v in variants), 0)
    for step in steps:
        out[select(variants, step).key] += 1
    return out
