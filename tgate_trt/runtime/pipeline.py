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
from ..families import SCHEDULERS, make_scheduler
from ..methods.plan import Step, TGateParams, family_plan
from ..methods.sampler import denoise
from ..methods.variants import GraphVariant, select
from .conditioning import TextConditioner, check_sizes
from .engine import Engine, OrtEngine, default_providers

BACKENDS = ("ort", "openvino", "trt")
WEIGHT_MODES = ("shared", "separate")
MAX_STEPS = mf.MAX_STEPS


@dataclass
class Result:
    images: list[Any]  # PIL images
    latents: np.ndarray  # final latents (before VAE scaling), float32
    timings: dict[str, float]  # seconds per stage
    calls: dict[str, int] = field(default_factory=dict)  # engine invocations this run
    truncated: dict[int, int] = field(default_factory=dict)  # prompt index -> its tokens, where past the window


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


def check_prompt_text(prompts: list[str], negatives: list[str] | None, family: mf.ModelFamily) -> None:
    """The prompt checks that need no tokenizer: a batch in range, no empty prompt, negatives that apply."""
    limits.check_batch(len(prompts))
    if any(not p.strip() for p in prompts):
        raise UsageError("prompt is empty: pass a text describing the image")
    if negatives is not None and not family.cfg:
        raise UsageError(f"this export is guidance-free ({family.family}: no CFG), so a negative_prompt has no effect")
    if negatives is not None and len(negatives) != len(prompts):
        raise UsageError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")


def check_token_counts(counts: list[int]) -> None:
    """A prompt the tokenizer reduces to nothing is refused like an empty one."""
    if 0 in counts:
        raise UsageError(
            "prompt has no tokens the model can read (only characters its tokenizer drops): "
            "pass a text describing the image"
        )


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
        # the pixel cap per image (a memory budget): the export's on this machine (Manifest.pixel_cap) unless
        # raised or lowered here
        self.max_pixels = manifest.max_pixels if max_pixels is None else limits.check_int("max_pixels", max_pixels, 1)
        self.scheduler_config = DDIMScheduler.load_config(str(root / manifest.scheduler))  # read once
        self.conditioner = TextConditioner(root, manifest, engines, tokenizer)
        self.variants = [GraphVariant.from_dict(k, v) for k, v in manifest.variants.items()]

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
        cpu_arena: str | None = None,
        weights: str = "shared",
    ) -> TGatePipeline:
        """Load an export folder; every file is checked against its sha256 first.

        OpenVINO: ``engines`` names the build folder inside the export (default ``openvino``), ``device``
        must be the one it was built for (default: that one), ``cache_dir`` keeps compiled models
        (default ``~/.cache/tgate-trt/openvino``; ``""`` disables), ``static_shapes`` compiles each graph for
        the shapes it is called with (faster per call; False keeps the graphs dynamic). ``max_pixels``
        overrides the export's cap on pixels per image; ``cpu_arena`` is ONNX Runtime's CPU memory arena
        (``session``, ``shared`` or ``off``: :func:`~tgate_trt.runtime.engine.session_options`; default
        ``shared``: the graphs run one after another, so one arena serves them all).

        ONNX Runtime on the CPU: ``weights="shared"`` (default) runs every UNet variant on one session of the
        gated graph, so the weights are held once (:mod:`.ort_gated`); ``weights="separate"`` loads a session,
        and a copy of the weights, per variant graph. OpenVINO: ``weights="shared"`` compiles the UNet variants
        as one model where they reference enough of the shared weights, ``"separate"`` compiles each alone."""
        from transformers import CLIPTokenizer

        if backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        limits.check_threads(threads)
        if weights not in WEIGHT_MODES:
            raise UsageError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
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
            if max_pixels is None:  # the memory cap, within what the plans' profiles take
                max_pixels = min(manifest.max_pixels, _profile_pixels(root, manifest))
        elif backend == "openvino":
            from .ov_engine import OV_DIR
            from .ov_engine import load_engines as load_ov

            share = None if weights == "shared" else False  # None: the variants combine where it pays
            loaded = dict(load_ov(root, manifest, engines or OV_DIR, device, threads, cache_dir, static_shapes, share))
        else:
            from .ort_gated import gated_views

            providers = list(providers or default_providers())
            arena = cpu_arena or "shared"
            views = None
            if weights == "shared" and providers == ["CPUExecutionProvider"] and len(manifest.variants) > 1:
                views = gated_views(root, manifest, providers, threads, arena)
            loaded = dict(views or {})
            for key, spec in manifest.graphs.items():
                if key not in loaded:
                    loaded[key] = OrtEngine(key, root / spec.file, spec, providers, threads, arena)
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
        check_prompt_text(prompts, negatives, self.manifest.model)
        check_token_counts(self.conditioner.token_counts(prompts))
        mf.check_gate(steps, gate_step)
        limits.check_guidance(guidance)
        self.manifest.check_native_size(height, width)
        size = self.manifest.latent_size(height, width, self.max_pixels)
        self._check_static(len(prompts), height, width)
        return size

    def truncated(self, prompts: list[str]) -> dict[int, int]:
        """Prompts longer than the text encoder reads: index -> token count (the rest is ignored)."""
        window = self.conditioner.window
        return {i: n for i, n in enumerate(self.conditioner.token_counts(prompts)) if n > window}

    def _check_static(self, batch: int, height: int, width: int) -> None:
        """Graphs with fixed dimensions (engines built for one shape) say which shape they take."""
        spec = self.manifest.graphs[next(iter(self.manifest.variants))].input(mf.SAMPLE)
        factor = self.manifest.latent["vae_scale_factor"]
        fixed_b, fixed_h, fixed_w = spec.shape[0], spec.shape[2], spec.shape[3]
        if isinstance(fixed_b, int) and fixed_b != batch:
            raise UsageError(f"these graphs take batch {fixed_b}, got {batch} prompts")
        if isinstance(fixed_h, int) and (fixed_h * factor, fixed_w * factor) != (height, width):
            raise UsageError(f"these graphs take {fixed_h * factor}x{fixed_w * factor} images, got {height}x{width}")

    def params(
        self, gate_step: int, sp_interval: int | None = None, fi_interval: int | None = None, warm_up: int | None = None
    ) -> TGateParams:
        """The T-GATE parameters of a call: the export's defaults where unset."""
        d = self.manifest.defaults
        return TGateParams(
            gate_step,
            d["sp_interval"] if sp_interval is None else sp_interval,
            d["fi_interval"] if fi_interval is None else fi_interval,
            d["warm_up"] if warm_up is None else warm_up,
        )

    def plan(self, steps: int, params: TGateParams, sched: Any) -> list[Step]:
        """The step plan for this export's family and ``sched``; refused (before any graph runs) when it
        needs a graph variant the export doesn't have."""
        sched.set_timesteps(steps)
        plan = family_plan(steps, params, self.manifest.model, sched.order, len(sched.timesteps))
        for step in plan:
            select(self.variants, step)
        return plan

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
        sp_interval: int | None = None,
        fi_interval: int | None = None,
        warm_up: int | None = None,
    ) -> Result:
        """Generate images. Unset steps, gate, guidance, size and the V2 intervals take the export's
        defaults (per family); ``scheduler`` defaults to the export's own; ``sizes`` overrides SDXL's
        ``original_size`` / ``crops_coords_top_left`` / ``target_size``. ``sp_interval`` / ``fi_interval``
        / ``warm_up`` schedule self-attention caching (T-GATE V2; needs an export with ``--schedule v2``)."""
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
        check_sizes(sizes)
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise UsageError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        seed = limits.check_seed(0 if seed is None else seed)
        sched = make_scheduler(self.scheduler_config, scheduler)  # a fresh one per run: schedulers keep step state
        plan = self.plan(num_inference_steps, self.params(gate_step, sp_interval, fi_interval, warm_up), sched)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        counts = {k: e.calls for k, e in self.engines.items()}
        timings: dict[str, float] = {}
        start = time.perf_counter()

        cond = self.conditioner(prompts, negatives, guidance_scale, height, width, sizes)
        batch = len(prompts)
        timings["text_encoder"] = time.perf_counter() - start

        shape = (batch, self.manifest.latent["channels"], h, w)
        from diffusers.utils.torch_utils import randn_tensor

        sched.set_timesteps(num_inference_steps)  # first: Euler's init_noise_sigma depends on the timesteps
        latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * sched.init_noise_sigma
        runner = _EngineRunner(self.engines, self.manifest.model, cond)
        timings["pregate"] = timings["postgate"] = 0.0

        def step_done(i: int, variant: GraphVariant, seconds: float) -> None:
            timings["pregate" if variant.reads_text else "postgate"] += seconds
            if progress:
                progress(i)

        latents = denoise(
            plan,
            self.variants,
            self.manifest.sites,
            runner,
            runner.conditioning,
            sched,
            latents,
            _step_kwargs(sched, generator),
            step_done,
        )

        vae_start = time.perf_counter()
        vae = self.engines[mf.VAE_DECODER]
        scaled = (latents / self.manifest.latent["scaling_factor"]).numpy()
        image = vae.numpy(vae({"latent_sample": vae.asarray(scaled, "latent_sample")})["sample"])
        images = to_pil(image.astype(np.float32))
        timings["vae_decoder"] = time.perf_counter() - vae_start
        timings["total"] = time.perf_counter() - start
        calls = {k: e.calls - counts[k] for k, e in self.engines.items()}
        return Result(images, latents.numpy(), timings, calls, self.truncated(prompts))


class _EngineRunner:
    """The sampler's runner for exported graphs: each variant's engine, its conditioning converted once."""

    def __init__(self, engines: dict[str, Engine], family: mf.ModelFamily, cond: dict[str, np.ndarray]) -> None:
        self.engines, self.family, self.cond = engines, family, cond
        self._feeds: dict[str, dict[str, Any]] = {}
        self._last: Engine | None = None

    def conditioning(self, variant: GraphVariant) -> dict[str, Any]:
        if variant.key not in self._feeds:
            engine = self.engines[variant.key]
            names = mf.conditioning_inputs(self.family, cfg=variant.cfg, text=variant.reads_text)
            self._feeds[variant.key] = {n: engine.asarray(self.cond[n], n) for n in names}
        return self._feeds[variant.key]

    def sample(self, variant: GraphVariant, x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        engine = self.engines[variant.key]
        return {mf.SAMPLE: engine.asarray(x.numpy(), mf.SAMPLE), mf.TIMESTEP: np.array([float(t)], np.float32)}

    def __call__(self, variant: GraphVariant, feeds: dict[str, Any]) -> dict[str, Any]:
        self._last = self.engines[variant.key]
        return self._last(feeds)

    def noise(self, value: Any) -> torch.Tensor:
        assert self._last is not None
        return torch.from_numpy(self._last.numpy(value).astype(np.float32))


def _profile_pixels(root: Path, manifest: mf.Manifest) -> int:
    """The largest image the TensorRT plans take: the smallest maximum of the UNet plans' ``sample`` profiles
    (``tgate-build`` records each plan's); the manifest's cap where the build section has none."""
    import json

    from .trt_engine import ENGINES_DIR, ENGINES_JSON

    path = root / ENGINES_DIR / ENGINES_JSON
    section = json.loads(path.read_text()) if path.is_file() else manifest.extra.get("engines", {})
    plans = section.get("plans", {})
    shapes = [plans[k].get("profile", {}).get(mf.SAMPLE) for k in manifest.variants if k in plans]
    pixels = [int(s[2][2] * s[2][3]) * manifest.latent["vae_scale_factor"] ** 2 for s in shapes if s]
    return min(pixels, default=manifest.max_pixels)


def to_pil(image: np.ndarray) -> list[Any]:
    """VAE output in [-1, 1], NCHW -> PIL images, rounded exactly as diffusers' image processor."""
    from PIL import Image

    arr = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def format_timings(timings: dict[str, float], calls: dict[str, int]) -> str:
    """Seconds and calls per stage; UNet calls are summed over the variants before / after the gate."""
    unet = {k: n for k, n in calls.items() if k.startswith("unet")}
    post = sum(n for k, n in unet.items() if k == mf.POSTGATE or k.startswith("unet_post"))
    rows = [
        ("text encoder", "text_encoder", calls.get(mf.TEXT_ENCODER, 0)),
        ("pre-gate steps", "pregate", sum(unet.values()) - post),
        ("post-gate steps", "postgate", post),
        ("VAE decoder", "vae_decoder", calls.get(mf.VAE_DECODER, 0)),
    ]
    lines = [f"{'stage':<16} {'calls':>5} {'seconds':>9}", "-" * 32]
    for label, key, n in rows:
        lines.append(f"{label:<16} {n:>5} {timings.get(key, 0.0):>9.3f}")
    lines.append(f"{'total':<16} {'':>5} {timings['total']:>9.3f}")
    return "\n".join(lines)
