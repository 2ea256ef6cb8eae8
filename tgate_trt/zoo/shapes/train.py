"""Train the ``shapes`` text-to-image model from scratch on CPU: VAE, then text encoder, then UNet.

The model has Stable Diffusion 1.5's *shape* (AutoencoderKL, CLIP text encoder, UNet2DConditionModel
with cross-attention at every level, epsilon prediction on SD's noise schedule) at a size that trains
on two CPU cores within two hours, so T-GATE can be measured on a model that draws what it is asked.
Every random draw comes from (seed, stage, step), and each stage checkpoints, so an interrupted run
resumes and ends with the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...contract import limits
from ...contract.cli import Parser, command
from ...contract.errors import OutputError, UsageError
from ...contract.files import MARKER, OutputDir, atomic_save, atomic_write_json, is_ours
from ...families import SD_SCHEDULER, make_scheduler
from . import WEIGHTS, WEIGHTS_RECORD, data
from .tokenizer import MAX_LENGTH, word_tokenizer

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "act_fn": "silu",
    "sample_size": data.SIZE,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": MAX_LENGTH,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": data.SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [64, 96, 128],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SCHEDULER_CONFIG: dict[str, Any] = {k: v for k, v in SD_SCHEDULER.items() if not k.startswith("_")}  # SD-1.5's


@dataclass
class Stage:
    steps: int
    batch: int
    lr: float


@dataclass
class TrainConfig:
    seed: int = 0
    vae: Stage = field(default_factory=lambda: Stage(steps=600, batch=32, lr=1e-3))
    text: Stage = field(default_factory=lambda: Stage(steps=300, batch=128, lr=1e-3))
    unet: Stage = field(default_factory=lambda: Stage(steps=2000, batch=64, lr=8e-4))
    empty_fraction: float = 0.1  # captions dropped so classifier-free guidance works
    ema_decay: float = 0.999
    latent_pool: int = 16384  # training images encoded once for the UNet stage
    stop_after: int | None = None  # optimiser steps in this run, then checkpoint and stop (time slicing)
    save_every: int = 100
    vae_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(VAE_CONFIG))
    text_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(TEXT_CONFIG))
    unet_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(UNET_CONFIG))


def tiny_config() -> TrainConfig:
    """A few steps of a smaller model: what the tests run."""
    cfg = TrainConfig(
        vae=Stage(3, 4, 1e-3), text=Stage(3, 8, 1e-3), unet=Stage(3, 4, 1e-3), save_every=2, latent_pool=16
    )
    cfg.vae_config["block_out_channels"] = [16, 16, 16]
    cfg.vae_config["norm_num_groups"] = 8
    cfg.unet_config.update(block_out_channels=[16, 32, 32], norm_num_groups=8)
    return cfg


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    offset = {"vae": 1, "text": 2, "unet": 3, "scale": 4, "pool": 5}[stage]
    return torch.Generator().manual_seed(seed * 1_000_003 + offset * 100_000_019 + step)


def _data_seed(seed: int, stage: str, step: int) -> int:
    return int(_generator(seed, stage, step).initial_seed() % (2**63))


def _lr(stage: Stage, step: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    warm = max(1, stage.steps // 20)
    if step < warm:
        return stage.lr * (step + 1) / warm
    progress = (step - warm) / max(1, stage.steps - warm)
    return stage.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _save(obj: dict[str, Any], path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


CHECKPOINTS = ("vae", "text", "unet")


def _remove_stale(work: Path) -> None:
    """Temp files of checkpoints a killed run was writing (``atomic_save``'s, and the older ``<stage>.tmp``)."""
    for name in (*CHECKPOINTS, "config"):
        for stale in [*work.glob(f".{name}.tmp-*"), work / f"{name}.tmp"]:
            if stale.is_file():
                stale.unlink()
                print(f"removed {stale}, left by an interrupted run", file=sys.stderr)


class Interrupted(RuntimeError):
    """Training stopped at a checkpoint (``stop_after``); running the same command again resumes it."""


class _Loop:
    """Resumable optimisation of one stage: model, optimiser, EMA copy and step live in one checkpoint."""

    def __init__(self, name: str, model: torch.nn.Module, stage: Stage, work: Path, cfg: TrainConfig) -> None:
        self.name, self.model, self.stage, self.cfg = name, model, stage, cfg
        self.path = work / f"{name}.pt"
        self.opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.step, self.seconds = 0, 0.0
        if self.path.exists():
            state = torch.load(self.path, weights_only=False)
            model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.seconds = state["step"], state["seconds"]

    def checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}
        _save({**state, "step": self.step, "seconds": self.seconds}, self.path)

    def run(self, loss_fn: Callable[[int], torch.Tensor], budget: list[int]) -> torch.nn.Module:
        """Optimise until the stage's steps are done; ``budget`` (shared by the stages) counts down the
        steps this run may still take."""
        self.model.train()
        bar = tqdm(total=self.stage.steps, initial=self.step, desc=f"train {self.name}", unit="step")
        while self.step < self.stage.steps:
            if budget[0] == 0:
                bar.close()
                raise Interrupted(f"stopped at {self.name} step {self.step}/{self.stage.steps}; rerun to resume")
            start = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.stage, self.step)
            loss = loss_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            self.step += 1
            self.seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            budget[0] -= 1
            if self.step % self.cfg.save_every == 0 or self.step == self.stage.steps or budget[0] == 0:
                self.checkpoint()
        bar.close()
        return self.ema.eval()


def _images(seed: int, stage: str, step: int, n: int, empty: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    images, captions, _ = data.batch(_data_seed(seed, stage, step), n, empty)
    return torch.from_numpy(images), captions


def train_vae(cfg: TrainConfig, work: Path, budget: list[int]) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    loop = _Loop("vae", AutoencoderKL(**cfg.vae_config), cfg.vae, work, cfg)

    def loss_fn(step: int) -> torch.Tensor:
        x, _ = _images(cfg.seed, "vae", step, cfg.vae.batch)
        posterior = loop.model.encode(x).latent_dist
        recon = loop.model.decode(posterior.sample(_generator(cfg.seed, "vae", step))).sample
        return F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()

    vae = loop.run(loss_fn, budget)
    with torch.no_grad():  # SD's convention: scale latents to unit variance
        x, _ = _images(cfg.seed, "scale", 0, 256)
        std = vae.encode(x).latent_dist.sample(_generator(cfg.seed, "scale", 0)).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae, loop.seconds


class _LatentEncoder(torch.nn.Module):
    """The image tower of a CLIP-style objective; only used to train the text encoder, then dropped."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 64, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            torch.nn.Flatten(),
            torch.nn.LazyLinear(dim),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _TextTower(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, image: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder, self.image = encoder, image
        self.proj = torch.nn.Linear(encoder.config.hidden_size, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))


def train_text(cfg: TrainConfig, work: Path, vae: Any, tokenizer: Any, budget: list[int]) -> Any:
    """CLIP's contrastive objective against the VAE latents; captions that repeat within a batch are all
    positives of each other."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 1)
    text_config = CLIPTextConfig(
        **cfg.text_config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dim = cfg.text_config["projection_dim"]
    image = _LatentEncoder(cfg.vae_config["latent_channels"], dim)
    image(torch.zeros(1, cfg.vae_config["latent_channels"], data.SIZE // 4, data.SIZE // 4))  # size LazyLinear
    tower = _TextTower(CLIPTextModel(text_config), image, dim)
    loop = _Loop("text", tower, cfg.text, work, cfg)

    def loss_fn(step: int) -> torch.Tensor:
        x, captions = _images(cfg.seed, "text", step, cfg.text.batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        t = F.normalize(tower.proj(tower.encoder(ids).pooler_output), dim=-1)
        v = F.normalize(tower.image(z), dim=-1)
        logits = tower.logit_scale.exp() * t @ v.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(dim=1, keepdim=True)
        return 0.5 * (
            -(target * logits.log_softmax(dim=1)).sum(1).mean() - (target * logits.T.log_softmax(dim=1)).sum(1).mean()
        )

    return loop.run(loss_fn, budget).encoder, loop.seconds


def _latent_pool(cfg: TrainConfig, vae: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode a fixed pool of training images once: the UNet stage then samples latents from the stored
    posteriors instead of running the VAE encoder every step (most of a step's cost at this size)."""
    means, stds, captions = [], [], []
    chunk = 256
    for i in tqdm(range(0, cfg.latent_pool, chunk), desc="encode latent pool", unit="chunk"):
        x, caps = _images(cfg.seed, "pool", i, min(chunk, cfg.latent_pool - i))
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        means.append(dist.mean * vae.config.scaling_factor)
        stds.append(dist.std * vae.config.scaling_factor)
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


def train_unet(cfg: TrainConfig, work: Path, vae: Any, text_encoder: Any, tokenizer: Any, budget: list[int]) -> Any:
    """Epsilon prediction with min-SNR-5 loss weighting, which converges faster on small budgets."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(cfg.seed + 2)
    unet_config = {**cfg.unet_config, "cross_attention_dim": text_encoder.config.hidden_size}
    loop = _Loop("unet", UNet2DConditionModel(**unet_config), cfg.unet, work, cfg)
    noise_sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if "offset" not in k})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    if loop.step >= cfg.unet.steps:
        return loop.ema.eval(), loop.seconds
    means, stds, captions = _latent_pool(cfg, vae)
    vocab = sorted(set(captions)) + [""]
    with torch.no_grad():
        ids = tokenizer(vocab, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        table = text_encoder(ids).last_hidden_state
    caption_index = torch.tensor([vocab.index(c) for c in captions])

    def loss_fn(step: int) -> torch.Tensor:
        g = _generator(cfg.seed, "unet", step)
        pick = torch.randint(0, len(captions), (cfg.unet.batch,), generator=g)
        z = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=g)
        text = torch.where(
            torch.rand(cfg.unet.batch, generator=g) < cfg.empty_fraction, len(vocab) - 1, caption_index[pick]
        )
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (z.shape[0],), generator=g)
        noise = torch.randn(z.shape, generator=g)
        pred = loop.model(noise_sched.add_noise(z, noise, t), t, table[text]).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    return loop.run(loss_fn, budget), loop.seconds


class WeightsDir(OutputDir):
    """Where a trained pipeline is published (:class:`OutputDir`: staged, locked, swapped in when complete).

    The pipeline folder carries no marker (the package ships none, and ``verify()`` would count one as a
    file), so its weights record is what makes it an earlier training output that ``force`` may replace.
    The package's own weights are replaced only with ``overwrite_shipped``; nothing may contain or lie
    inside them, or overlap the checkpoint folder.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        force: bool = False,
        sources: Iterable[str | os.PathLike[str] | None] = (),
        overwrite_shipped: bool = False,
    ) -> None:
        super().__init__(out, force=force or overwrite_shipped, sources=sources)
        self.overwrite_shipped = overwrite_shipped

    def check(self) -> None:
        real, shipped = self.out.resolve(), WEIGHTS.resolve()
        if real == shipped and not self.overwrite_shipped:
            raise OutputError(
                f"--out {self.given} is the package's shipped shapes weights: pass --overwrite-shipped to "
                "replace them, or choose another --out"
            )
        if real != shipped and (shipped in real.parents or real in shipped.parents):
            raise OutputError(
                f"--out {self.given} contains or lies inside the package's shipped weights ({shipped}): "
                "choose another --out"
            )
        for src in self.sources:
            if shipped == src or shipped in src.parents or src in shipped.parents:
                raise OutputError(f"--work {src} overlaps the package's shipped weights: choose another --work")
        earlier = self.out.is_dir() and (self.out / WEIGHTS_RECORD).is_file() and not is_ours(self.out)
        if not (earlier and self.force):
            super().check()
            return
        # an earlier training output, with --force: OutputDir's checks but the marker's
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise OutputError(f"--out {self.given} is or contains the current folder: choose another --out")
        for src in self.sources:
            if real == src or src in real.parents or real in src.parents:
                raise OutputError(f"--out {self.given} overlaps --work {src}: keep checkpoints outside the output")
        if not os.access(real, os.W_OK | os.X_OK) or not os.access(real.parent, os.W_OK | os.X_OK):
            raise OutputError(f"--out {self.given} (or its folder) is read-only: it can't be replaced")


def check_output(out: Path, work: Path, force: bool = False, overwrite_shipped: bool = False) -> WeightsDir:
    """The output and checkpoint folders, checked before anything is trained."""
    if work.exists() and not work.is_dir():
        raise OutputError(f"--work {work} is a file: pass a folder for the checkpoints")
    target = WeightsDir(out, force=force, sources=[work], overwrite_shipped=overwrite_shipped)
    target.check()
    return target


def train(
    out: Path,
    work: Path,
    cfg: TrainConfig,
    command: str = "",
    dtype: torch.dtype = torch.float16,
    force: bool = False,
    overwrite_shipped: bool = False,
) -> Path:
    """Run the three stages (resuming from ``work``) and publish the pipeline as ``out`` when complete.

    ``out`` may replace an earlier training output only with ``force``, the package's shipped weights
    only with ``overwrite_shipped``; anything else in the way is refused before training starts.
    """
    from diffusers import StableDiffusionPipeline

    from . import record_hashes

    with check_output(out, work, force, overwrite_shipped) as tmp:  # locked while training
        work.mkdir(parents=True, exist_ok=True)
        _remove_stale(work)
        atomic_write_json(work / "config.json", asdict(cfg), indent=1)
        tokenizer = word_tokenizer(work / "tokenizer", data.vocabulary())
        start = time.perf_counter()
        budget = [cfg.stop_after if cfg.stop_after else -1]
        vae, vae_s = train_vae(cfg, work, budget)
        text_encoder, text_s = train_text(cfg, work, vae, tokenizer, budget)
        unet, unet_s = train_unet(cfg, work, vae, text_encoder, tokenizer, budget)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet.eval(),
            scheduler=make_scheduler(SCHEDULER_CONFIG, "ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(dtype).save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).unlink()  # not shipped with the package, so not part of the record
        record = {
            "command": command,
            "dtype": str(dtype).removeprefix("torch."),
            "train_seconds": {"vae": round(vae_s, 1), "text_encoder": round(text_s, 1), "unet": round(unet_s, 1)},
            "wall_seconds_this_run": round(time.perf_counter() - start, 1),
            "torch_threads": torch.get_num_threads(),
            "config": asdict(cfg),
            "parameters": {
                "vae": sum(p.numel() for p in vae.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                "unet": sum(p.numel() for p in unet.parameters()),
            },
            "files": record_hashes(tmp),
        }
        (tmp / WEIGHTS_RECORD).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return out


def config_with(cfg: TrainConfig, **steps: int) -> TrainConfig:
    """``cfg`` with the steps of some stages replaced (``vae=..., text=..., unet=...``)."""
    return replace(cfg, **{k: replace(getattr(cfg, k), steps=v) for k, v in steps.items()})


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_parser(prog: str = "train_shapes") -> Parser:
    p = Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        help="diffusers folder to write (a new one, or an earlier training output with --force); "
        "to retrain the package's own weights, pass --overwrite-shipped instead",
    )
    p.add_argument(
        "--overwrite-shipped",
        action="store_true",
        help=f"replace the weights shipped with the package ({WEIGHTS}): the default --out then",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier training output")
    p.add_argument("--work", type=Path, default=Path(".train_shapes"), help="checkpoint folder (resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the noise")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    p.add_argument("--vae-steps", type=int, help="VAE training steps (default: 600; with --tiny, fewer)")
    p.add_argument("--text-steps", type=int, help="text encoder training steps (default: 300; with --tiny, fewer)")
    p.add_argument("--unet-steps", type=int, help="UNet training steps (default: 2000; with --tiny, fewer)")
    p.add_argument("--tiny", action="store_true", help="a few steps of a smaller model (smoke test)")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps (resume later)")
    p.add_argument("--fp32", action="store_true", help="save float32 weights instead of float16")
    return p


MAX_TRAIN_STEPS = 10_000_000


@command("train_shapes")
def main(argv: Sequence[str], script: str = "python -m tgate_trt.zoo.shapes.train") -> int:
    """The training CLI; ``scripts/train_shapes.py`` runs it with ``script`` naming itself in the record.

    Exit 3: stopped at a checkpoint (``--stop-after``); the same command resumes.
    """
    args = build_parser().parse_args(argv)
    limits.check_int("--seed", args.seed, 0, 2**32 - 1)  # numpy's seed range
    limits.check_int("--threads", args.threads, 1, 4096)
    for name in ("vae_steps", "text_steps", "unet_steps", "stop_after"):
        if getattr(args, name) is not None:
            limits.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1, MAX_TRAIN_STEPS)
    if args.out is None:
        if not args.overwrite_shipped:
            raise UsageError(
                "pass --out DIR for a newly trained model, or --overwrite-shipped to retrain the package's weights"
            )
        args.out = WEIGHTS
    check_output(args.out, args.work, args.force, args.overwrite_shipped)
    torch.set_num_threads(args.threads)
    cfg = tiny_config() if args.tiny else TrainConfig()
    cfg.seed, cfg.stop_after = args.seed, args.stop_after
    steps = {k: v for k, v in {"vae": args.vae_steps, "text": args.text_steps, "unet": args.unet_steps}.items() if v}
    cfg = config_with(cfg, **steps)
    record = shlex.join([*shlex.split(script), *argv])
    dtype = torch.float32 if args.fp32 else torch.float16
    try:
        out = train(args.out, args.work, cfg, record, dtype, args.force, args.overwrite_shipped)
    except Interrupted as exc:
        print(exc)
        return 3
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
