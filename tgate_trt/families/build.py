"""The one builder for seeded random weights (``--random-weights``, the ``tiny*`` presets) and the one
tokenizer builder: nothing here downloads anything (and torch is imported only when building)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import ARCHITECTURES, TINY_SEED
from .schedulers import make_scheduler
from .spec import FAMILIES

if TYPE_CHECKING:
    import torch

CLIP_VOCAB = 49408  # CLIP's vocabulary, kept by full-size presets so their embedding tables are the real size


# --- tokenizers ------------------------------------------------------------------------------------------
def write_clip_tokenizer(folder: Path, merges: Sequence[tuple[str, str]] = ()) -> Path:
    """Write a CLIP BPE vocabulary into ``folder``: every byte character, alone and word-final, plus the
    symbols ``merges`` build. With no merges it is character-level: a real ``CLIPTokenizer`` that works
    offline and stands in for CLIP's 49k vocabulary wherever only the architecture matters."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def clip_tokenizer(
    folder: Path | None = None,
    merges: Sequence[tuple[str, str]] = (),
    max_length: int = 77,
    pad_token: str | None = None,
) -> Any:
    """A ``CLIPTokenizer`` over :func:`write_clip_tokenizer`'s vocabulary, written into ``folder`` (kept)
    or a temporary folder. ``pad_token`` "!" is OpenCLIP's (SD-2.x, SDXL's second tokenizer)."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    with tempfile.TemporaryDirectory() as tmp:
        where = write_clip_tokenizer(Path(tmp) if folder is None else folder, merges)
        return CLIPTokenizer(
            str(where / "vocab.json"), str(where / "merges.txt"), model_max_length=max_length, **kwargs
        )


# --- modules with seeded random weights --------------------------------------------------------------------
@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _perturb_constant_parameters(module: torch.nn.Module, std: float = 0.02) -> None:
    """Give norm weights and zero biases small noise, as training would.

    Fresh initialisation makes hundreds of tensors identical (all ones or zeros); the ONNX exporter
    then stores them once, so graph sizes and parameter counts would not be those of a trained model.
    """
    import torch

    with torch.no_grad():
        for param in module.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * std)


def _text_encoder(cfg: dict[str, Any], tokenizer: Any, full_size: bool, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **{k: v for k, v in cfg.items() if k != "pad_token"},
        vocab_size=max(len(tokenizer), CLIP_VOCAB if full_size else 0),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_from_architecture(name: str, seed: int = TINY_SEED) -> Any:
    """A pipeline with preset ``name``'s architecture and seeded random weights, built as its family's
    pipeline class (:class:`~.spec.FamilySpec`); nothing is downloaded."""
    import diffusers

    arch = ARCHITECTURES[name]
    spec = FAMILIES[arch["family"]]
    full_size = not name.startswith("tiny")
    tokenizers = {e.tokenizer: clip_tokenizer(pad_token=arch[e.graph].get("pad_token")) for e in spec.text_encoders}
    with _seeded(seed):
        unet = diffusers.UNet2DConditionModel(**arch["unet"]).eval()
        vae = diffusers.AutoencoderKL(**arch["vae"]).eval()
        encoders = {
            e.graph: _text_encoder(arch[e.graph], tokenizers[e.tokenizer], full_size, projection=e.pooled)
            for e in spec.text_encoders
        }
        for module in (unet, vae, *encoders.values()):
            _perturb_constant_parameters(module)
    cls = getattr(diffusers, spec.pipeline)
    if spec.added_conditioning:  # SDXL's invisible watermark is post-processing outside the graphs
        extra: dict[str, Any] = {"add_watermarker": False}
    else:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = cls(
        vae=vae, unet=unet, scheduler=make_scheduler(arch["scheduler"]), **encoders, **tokenizers, **extra
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny(seed: int = TINY_SEED) -> Any:
    """The deterministic tiny SD-1.5-shaped pipeline used by tests and the README's first command."""
    return build_from_architecture("tiny", seed)
