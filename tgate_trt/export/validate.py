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
from ..contract.quiet import ort_log_level
from ..methods.variants import GraphVariant, variants_for
from .graphs import ExportOptions, text_encoder_keys, unet_example, vae_upcast, variant_feeds, variant_modules

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
    opts.log_severity_level = ort_log_level()  # errors only; warnings too with --verbose
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


def _check_text_encoders(
    pipe: Any, root: Path, family: mf.ModelFamily, dtype: str, step: Callable[[str], None]
) -> list[Check]:
    """Every text encoder graph against PyTorch on the outputs the runtime reads (all of optimum's)."""
    checks = []
    for key in text_encoder_keys(family):
        step(f"validate {key.replace('_', ' ')}")
        tokenizer = pipe.tokenizer_2 if key == mf.TEXT_ENCODER_2 else pipe.tokenizer
        encoder = getattr(pipe, key)
        sess = _session(root / mf.graph_file(key, unet=False))
        ids = tokenizer(
            VALIDATION_PROMPTS,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        names = [o.name for o in sess.get_outputs()]
        with torch.no_grad():
            ref = encoder(ids, output_hidden_states=any(n.startswith("hidden_states.") for n in names))
        want = [
            ref.hidden_states[int(n.split(".")[1])] if n.startswith("hidden_states.") else getattr(ref, n)
            for n in names
        ]
        got = sess.run(names, {"input_ids": ids.numpy()})
        checks.append(_compare(key, "2 prompts", got, want, dtype))
    return checks


def validate_export(
    pipe: Any,
    root: Path,
    opts: ExportOptions,
    family: mf.ModelFamily,
    progress: Callable[[str], None] | None = None,
    variants: tuple[GraphVariant, ...] | None = None,
) -> list[Check]:
    """Run every graph of ``family``'s export in ORT and PyTorch; returns one :class:`Check` per graph and case."""
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    cases = [
        ("batch 2", 2, opts.height, opts.width),
        ("batch 1, larger", 1, opts.height + multiple, opts.width + 2 * multiple),
    ]

    def step(msg: str) -> None:
        if progress:
            progress(msg)

    checks = _check_text_encoders(pipe, root, family, opts.dtype, step)
    modules = variant_modules(pipe, variants or variants_for("v1", family.cfg), family)
    vae_dtype = "fp32" if vae_upcast(pipe, family, opts) else opts.dtype
    examples = [
        (f"{name} {h}x{w}", unet_example(pipe, ExportOptions(opts.dtype, opts.opset, h, w), batch=batch, seed=1,
                                         family=family))
        for name, batch, h, w in cases
    ]  # fmt: skip
    found: dict[tuple[str, str], Check] = {}
    for key, module in modules.items():  # one session at a time: each UNet variant holds the UNet's weights
        step(f"validate {key}")
        session = _session(root / mf.graph_file(key, unet=True))
        for case, inputs in examples:
            # a replaying graph gets the PyTorch caches, as the pipeline hands it the graph's own
            feeds = variant_feeds(modules, module.variant, inputs)
            with torch.no_grad():
                ref = module(**feeds)
            got = session.run(None, _np(feeds))
            found[case, key] = _compare(key, case, got, list(ref) if isinstance(ref, tuple) else [ref], opts.dtype)
        del session
    step("validate VAE decoder")
    sess_vae = _session(root / mf.graph_file(mf.VAE_DECODER, unet=False))
    for case, inputs in examples:
        checks += [found[case, key] for key in modules]
        latent = inputs[mf.SAMPLE].to(pipe.vae.dtype)
        with torch.no_grad():
            ref_img = pipe.vae.decode(latent, return_dict=False)[0]
        got_img = sess_vae.run(None, {"latent_sample": latent.numpy()})
        checks.append(_compare(mf.VAE_DECODER, case, got_img, [ref_img], vae_dtype))
    return checks


def format_table(checks: list[Check]) -> str:
    header = f"{'graph':<17} {'case':<28} {'max abs diff':>13} {'tolerance':>11}  pass"
    lines = [header, "-" * len(header)]
    for c in checks:
        verdict = "yes" if c.passed else "NO"
        lines.append(f"{c.graph:<17} {c.case:<28} {c.max_abs_diff:>13.3e} {c.tolerance:>11.3e}  {verdict}")
    return "\n".join(lines)
