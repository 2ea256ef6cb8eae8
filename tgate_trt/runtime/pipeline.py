"""The T-GATE denoising loop over exported graphs: pre-gate engine with CFG, then post-gate engine.

It reads only ``manifest.json`` and the files it names; schedulers come from diffusers, configured from
the exported scheduler config, and noise from torch's generator so a seed gives the same image as the
PyTorch reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import manifest as mf
from ..contract import limits
from ..contract.errors import UsageError
from ..methods.plan import TGateParams, family_plan
from .conditioning import TextConditioner
from .engine import Engine, OrtEngine

SCHEDULERS = ("ddim", "euler", "dpm++", "lcm")
# The export's own scheduler class, when it is one of ours, is the default (SDXL: Euler, LCM: LCM).
_SCHEDULER_NAMES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++",
    "LCMScheduler": "lcm",
}
BACKENDS = ("ort", "openvino", "trt")
MAX_STEPS = mf.MAX_STEPS


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A fresh scheduler per run (schedulers keep step state), from the export's config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    if name == "lcm":
        return LCMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise UsageError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


@dataclass
class Result:
    images: list[Any]  # PIL images
    latents: np.ndarray  # final latents (before VAE scaling), float32
    timings: dict[str, float]  # seconds per stage
    calls: dict[str, int] = field(default_factory=dict)  # engine invocations this run
    truncated: dict[int, int] = field(default_factory=dict)  # prompt index -> its tokens, where past the window


def default_scheduler(config: dict[str, Any]) -> str:
    """The export's scheduler when we support its class, else DDIM (e.g. SD-1.5's PNDM)."""
    return _SCHEDULER_NAMES.get(str(config.get("_class_name")), "ddim")


def _step_kwargs(sched: Any, generator: torch.Generator) -> dict[str, Any]:
    """The generator for schedulers that draw noise in ``step`` (LCM), as diffusers' pipelines pass it."""
    import inspect

    return {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}


def _as_list(prompt: str | list[str], what: str) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise UsageError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise UsageError(f"{what} must be a string or a non-empty list of strings")
    return prompts


class TGatePipeline:
    def __init__(
        self,
        root: Path,
        manifest: mf.Manifest,
        engines: dict[str, Engine],
        tokenizer: Any,
        max_pixels: int | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        self.root, self.manifest, self.engines, self.tokenizer = root, manifest, engines, tokenizer
        # the pixel cap per image (a memory budget): the export's unless raised or lowered here
        self.max_pixels = manifest.max_pixels if max_pixels is None else limits.check_int("max_pixels", max_pixels, 1)
        self.scheduler_config = DDIMScheduler.load_config(str(root / manifest.scheduler))  # read once
        self.conditioner = TextConditioner(root, manifest, engines, tokenizer)

    @classmethod
    def from_export(
        cls,
        root: str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        threads: int = 0,
        engines: str | None = None,
        device: str | None = None,
        cache_dir: str | Path | None = None,
        static_shapes: bool = True,
        max_pixels: int | None = None,
    ) -> TGatePipeline:
        """Load an export folder; every file is checked against its sha256 first.

        OpenVINO: ``engines`` names the build folder inside the export (default ``openvino``), ``device``
        must be the one it was built for (default: that one), ``cache_dir`` keeps compiled models
        (default ``~/.cache/tgate-trt/openvino``; ``""`` disables), ``static_shapes`` compiles each graph for
        the shapes it is called with (faster per call; False keeps the graphs dynamic). ``max_pixels``
        overrides the export's cap on pixels per image."""
        from transformers import CLIPTokenizer

        if backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        limits.check_int("threads", threads, 0)
        if max_pixels is not None:
            limits.check_int("max_pixels", max_pixels, 1)
        root = Path(root)
        manifest = mf.Manifest.load(root, verify=False)  # schema first, hashes next, loading last
        # OpenVINO reads its IR (checked by its loader), not the ONNX graphs
        manifest.verify(root, graphs=() if backend == "openvino" else None)
        loaded: dict[str, Engine]
        if backend == "trt":
            from .trt_engine import load_engines  # TensorRT and CUDA are imported only here

            loaded = dict(load_engines(root))
        elif backend == "openvino":
            from .ov_engine import OV_DIR
            from .ov_engine import load_engines as load_ov

            loaded = dict(load_ov(root, manifest, engines or OV_DIR, device, threads, cache_dir, static_shapes))
        else:
            loaded = {
                key: OrtEngine(key, root / spec.file, spec, providers, threads)
                for key, spec in manifest.graphs.items()
            }
        tokenizer = CLIPTokenizer.from_pretrained(str(root / manifest.text["tokenizer"]))
        return cls(root, manifest, loaded, tokenizer, max_pixels)

    # --- checks, before any heavy work -----------------------------------------------------------
    def check(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        steps: int,
        gate_step: int,
        guidance: float,
        height: int,
        width: int,
    ) -> tuple[int, int]:
        """Every argument in range, before any graph runs; returns the latent size."""
        limits.check_batch(len(prompts))
        if any(not p.strip() for p in prompts):
            raise UsageError("prompt is empty: pass a text describing the image")
        if 0 in self.conditioner.token_counts(prompts):
            raise UsageError(
                "prompt has no tokens the model can read (only characters its tokenizer drops): "
                "pass a text describing the image"
            )
        family = self.manifest.model
        if negatives is not None and not family.cfg:
            raise UsageError(
                f"this export is guidance-free ({family.family}: no CFG), so a negative_prompt has no effect"
            )
        if negatives is not None and len(negatives) != len(prompts):
            raise UsageError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        mf.check_gate(steps, gate_step)
        limits.check_guidance(guidance)
        size = self.manifest.latent_size(height, width, self.max_pixels)
        self._check_static(len(prompts), height, width)
        return size

    def truncated(self, prompts: list[str]) -> dict[int, int]:
        """Prompts longer than the text encoder reads: index -> token count (the rest is ignored)."""
        window = self.conditioner.window
        return {i: n for i, n in enumerate(self.conditioner.token_counts(prompts)) if n > window}

    def _check_static(self, batch: int, height: int, width: int) -> None:
        """Graphs with fixed dimensions (engines built for one shape) say which shape they take."""
        spec = self.manifest.graphs[mf.PREGATE].input(mf.SAMPLE)
        factor = self.manifest.latent["vae_scale_factor"]
        fixed_b, fixed_h, fixed_w = spec.shape[0], spec.shape[2], spec.shape[3]
        if isinstance(fixed_b, int) and fixed_b != batch:
            raise UsageError(f"these graphs take batch {fixed_b}, got {batch} prompts")
        if isinstance(fixed_h, int) and (fixed_h * factor, fixed_w * factor) != (height, width):
            raise UsageError(
                f"these graphs take {fixed_h * factor}x{fixed_w * factor} images, got {height}x{width}"
            )

    # --- the run ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> np.ndarray:
        """The text states the UNet reads for ``prompts`` (all encoders' outputs, concatenated)."""
        return self.conditioner.encode(prompts)[0]

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        gate_step: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        scheduler: str | None = None,
        progress: Callable[[int], None] | None = None,
        sizes: dict[str, Any] | None = None,
    ) -> Result:
        """Generate images. Unset steps, gate, guidance and size take the export's defaults (per
        family); ``scheduler`` defaults to the export's own; ``sizes`` overrides SDXL's
        ``original_size`` / ``crops_coords_top_left`` / ``target_size``."""
        defaults = self.manifest.defaults
        num_inference_steps = defaults["steps"] if num_inference_steps is None else num_inference_steps
        gate_step = defaults["gate_step"] if gate_step is None else gate_step
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        h, w = self.check(prompts, negatives, num_inference_steps, gate_step, guidance_scale, height, width)
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise UsageError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        seed = limits.check_seed(0 if seed is None else seed)
        sched = make_scheduler(scheduler or default_scheduler(self.scheduler_config), self.scheduler_config)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        counts = {k: e.calls for k, e in self.engines.items()}
        timings: dict[str, float] = {}
        start = time.perf_counter()

        cond = self.conditioner(prompts, negatives, guidance_scale, height, width, sizes)
        batch = len(prompts)
        timings["text_encoder"] = time.perf_counter() - start

        pre, post = self.engines[mf.PREGATE], self.engines[mf.POSTGATE]
        shape = (batch, self.manifest.latent["channels"], h, w)
        from diffusers.utils.torch_utils import randn_tensor

        sched.set_timesteps(num_inference_steps)  # first: Euler's init_noise_sigma depends on the timesteps
        latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * sched.init_noise_sigma
        step_kwargs = _step_kwargs(sched, generator)
        family = self.manifest.model
        pre_feeds = {n: pre.asarray(cond[n], n) for n in mf.conditioning_inputs(family, postgate=False)}
        post_feeds = {n: post.asarray(cond[n], n) for n in mf.conditioning_inputs(family, postgate=True)}
        caches: dict[str, Any] = {}
        names = self.manifest.cache_names
        timings["pregate"] = timings["postgate"] = 0.0
        steps = family_plan(num_inference_steps, TGateParams.v1(gate_step), family, sched.order, len(sched.timesteps))
        for i, (step, t) in enumerate(zip(steps, sched.timesteps, strict=True)):
            step_start = time.perf_counter()
            x = sched.scale_model_input(latents, t).numpy()
            timestep = np.array([float(t)], np.float32)
            if "attn2" not in step.replay:  # the pre-gate graph (CFG inside when the family has it)
                out = pre({mf.SAMPLE: pre.asarray(x, mf.SAMPLE), mf.TIMESTEP: timestep, **pre_feeds})
                if step.capture:  # the gate step: its caches are the ones replayed
                    caches = {n: out[n] for n in names}
                noise, engine, stage = out[mf.NOISE_PRED], pre, "pregate"
            else:
                out = post({mf.SAMPLE: post.asarray(x, mf.SAMPLE), mf.TIMESTEP: timestep, **post_feeds, **caches})
                noise, engine, stage = out[mf.NOISE_PRED], post, "postgate"
            noise_t = torch.from_numpy(engine.numpy(noise).astype(np.float32))
            latents = sched.step(noise_t, t, latents, **step_kwargs, return_dict=False)[0]
            timings[stage] += time.perf_counter() - step_start
            if progress:
                progress(i)

        vae_start = time.perf_counter()
        vae = self.engines[mf.VAE_DECODER]
        scaled = (latents / self.manifest.latent["scaling_factor"]).numpy()
        image = vae.numpy(vae({"latent_sample": vae.asarray(scaled, "latent_sample")})["sample"])
        images = to_pil(image.astype(np.float32))
        timings["vae_decoder"] = time.perf_counter() - vae_start
        timings["total"] = time.perf_counter() - start
        calls = {k: e.calls - counts[k] for k, e in self.engines.items()}
        return Result(images, latents.numpy(), timings, calls, self.truncated(prompts))


def to_pil(image: np.ndarray) -> list[Any]:
    """VAE output in [-1, 1], NCHW -> PIL images, rounded exactly as diffusers' image processor."""
    from PIL import Image

    arr = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def format_timings(timings: dict[str, float], calls: dict[str, int]) -> str:
    rows = [
        ("text encoder", "text_encoder", mf.TEXT_ENCODER),
        ("pre-gate steps", "pregate", mf.PREGATE),
        ("post-gate steps", "postgate", mf.POSTGATE),
        ("VAE decoder", "vae_decoder", mf.VAE_DECODER),
    ]
    lines = [f"{'stage':<16} {'calls':>5} {'seconds':>9}", "-" * 32]
    for label, key, graph in rows:
        lines.append(f"{label:<16} {calls.get(graph, 0):>5} {timings.get(key, 0.0):>9.3f}")
    lines.append(f"{'total':<16} {'':>5} {timings['total']:>9.3f}")
    return "\n".join(lines)
