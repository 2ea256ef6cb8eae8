"""``tgate-bench``'s PyTorch rows: diffusers (a), the authors' tgate (b), and (b) under bf16 autocast (b16);
(b-v2) and (b16-v2) run the authors' package with V2's self-attention schedule (``--sp-interval`` etc.).

(b16) is the cheapest speed-up a PyTorch user has on a CPU with bf16 units, so T-GATE on OpenVINO has to
beat it, not only fp32 PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

TORCH_VARIANTS = ("a", "b", "b16", "b-v2", "b16-v2")


class StageTimer:
    """Forward hooks that add up wall time per PyTorch module, for per-stage times of torch pipelines."""

    def __init__(self, pipe: Any, gate: int) -> None:
        self.gate, self.unet_calls = gate, 0
        self.times: dict[str, float] = {}
        self._start: dict[str, float] = {}
        for name in ("text_encoder", "unet", "vae"):
            module = getattr(pipe, name)
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        # the VAE decode path is not a forward call: time it through decode
        vae, decode = pipe.vae, pipe.vae.decode

        def timed_decode(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = decode(*a, **k)
            self.times["vae_decoder"] = self.times.get("vae_decoder", 0.0) + time.perf_counter() - t
            return out

        vae.decode = timed_decode

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            key = name
            if name == "unet":  # UNet calls from the gate on are the post-gate steps
                key = "pregate" if self.unet_calls < self.gate else "postgate"
                self.unet_calls += 1
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - self._start[name]

        return hook


def torch_variant(kind: str, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    """One timed run of variant ``kind`` (a, b, b16, b-v2 or b16-v2) per call, with per-stage times."""
    import torch

    from ..families import resolve_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = resolve_model(args.model, args.random_weights).pipe
    timer = StageTimer(pipe, args.steps if kind == "a" else args.gate)
    kw = {"num_inference_steps": args.steps, "height": args.height, "width": args.width, "output_type": "pil"}
    # V1: cache from the gate on, no warm-up; V2: self-attention on the given schedule too
    v2 = kind.endswith("-v2")
    names = ("sp_interval", "fi_interval", "warm_up")
    schedule = {k: getattr(args, k) for k in names} if v2 else {"sp_interval": 1, "fi_interval": 1, "warm_up": 0}
    if kind != "a":
        import tgate

        sdxl = "XL" in type(pipe).__name__
        pipe = (tgate.TgateSDXLLoader if sdxl else tgate.TgateSDLoader)(pipe)

    def once() -> dict[str, float]:
        timer.times.clear()
        timer.unet_calls = 0
        gen = torch.Generator().manual_seed(args.seed)
        bf16 = kind.startswith("b16")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        start = time.perf_counter()
        with autocast:
            if kind == "a":
                pipe(args.prompt, generator=gen, **kw)
            else:
                pipe.tgate(args.prompt, gate_step=args.gate, generator=gen, **schedule, **kw)
        times = dict(timer.times)
        times["total"] = time.perf_counter() - start
        return times

    return once
