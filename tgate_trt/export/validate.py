"""Numerical validation of every exported graph: ONNX Runtime against PyTorch on seeded inputs.

Each graph runs at batch 2 and at a second, larger image size than it was traced with, so a graph
whose dynamic axes silently froze to the trace shape fails here rather than in a user's pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import manifest as mf
from .graphs import ExportOptions, unet_example
from .tgate import PostGateUNet, PreGateUNet

# Tolerance on max |ort - torch|: atol + rtol * max |torch| (same dtype on both sides).
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 1e-2)}
VALIDATION_PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle on the left"]


@dataclass
class Check:
    graph: str
    case: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(graph: str, case: str, ort_out: list[np.ndarray], ref: list[torch.Tensor], dtype: str) -> Check:
    atol, rtol = TOLERANCES[dtype]
    diff, scale = 0.0, 0.0
    for got, want in zip(ort_out, ref, strict=True):
        w = want.detach().float().numpy()
        if got.shape != w.shape:
            return Check(graph, case, float("inf"), 0.0)
        diff = max(diff, float(np.abs(got.astype(np.float32) - w).max()))
        scale = max(scale, float(np.abs(w).max()))
    return Check(graph, case, diff, atol + rtol * scale)


def _np(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


def validate_export(
    pipe: Any, root: Path, opts: ExportOptions, progress: Callable[[str], None] | None = None
) -> list[Check]:
    """Run every graph in ORT and PyTorch; returns one :class:`Check` per graph and case."""
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    cases = [
        ("batch 2", 2, opts.height, opts.width),
        ("batch 1, larger", 1, opts.height + multiple, opts.width + 2 * multiple),
    ]
    checks: list[Check] = []
    dt = opts.torch_dtype

    def step(msg: str) -> None:
        if progress:
            progress(msg)

    step("validate text encoder")
    sess = _session(root / mf.TEXT_ENCODER / "model.onnx")
    ids = pipe.tokenizer(
        VALIDATION_PROMPTS,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)
    got = sess.run(["last_hidden_state", "pooler_output"], {"input_ids": ids.numpy()})
    checks.append(
        _compare(mf.TEXT_ENCODER, "2 prompts", got, [ref.last_hidden_state, ref.pooler_output], opts.dtype)
    )

    pre, post = PreGateUNet(pipe.unet), PostGateUNet(pipe.unet)
    sess_pre = _session(root / mf.PREGATE / "model.onnx")
    sess_post = _session(root / mf.POSTGATE / "model.onnx")
    sess_vae = _session(root / mf.VAE_DECODER / "model.onnx")
    for name, batch, h, w in cases:
        case = f"{name} {h}x{w}"
        step(f"validate UNet graphs ({case})")
        inputs = unet_example(pipe, ExportOptions(opts.dtype, opts.opset, h, w), batch=batch, seed=1)
        with torch.no_grad():
            ref_pre = list(pre(**inputs))
        got_pre = sess_pre.run(None, _np(inputs))
        checks.append(_compare(mf.PREGATE, case, got_pre, ref_pre, opts.dtype))
        # The post-gate graph replays the PyTorch caches, as the pipeline replays the graph's own.
        caches = ref_pre[1:]
        post_inputs = {mf.SAMPLE: inputs[mf.SAMPLE], mf.TIMESTEP: torch.tensor([250.0])}
        post_inputs.update({mf.cache_name(i): c for i, c in enumerate(caches)})
        with torch.no_grad():
            ref_post = post(post_inputs[mf.SAMPLE], post_inputs[mf.TIMESTEP], *caches)
        got_post = sess_post.run(None, _np(post_inputs))
        checks.append(_compare(mf.POSTGATE, case, got_post, [ref_post], opts.dtype))

        step(f"validate VAE decoder ({case})")
        latent = inputs[mf.SAMPLE].to(dt)
        with torch.no_grad():
            ref_img = pipe.vae.decode(latent, return_dict=False)[0]
        got_img = sess_vae.run(None, {"latent_sample": latent.numpy()})
        checks.append(_compare(mf.VAE_DECODER, case, got_img, [ref_img], opts.dtype))
    return checks


def format_table(checks: list[Check]) -> str:
    header = f"{'graph':<15} {'case':<28} {'max abs diff':>13} {'tolerance':>11}  pass"
    lines = [header, "-" * len(header)]
    for c in checks:
        verdict = "yes" if c.passed else "NO"
        lines.append(f"{c.graph:<15} {c.case:<28} {c.max_abs_diff:>13.3e} {c.tolerance:>11.3e}  {verdict}")
    return "\n".join(lines)
