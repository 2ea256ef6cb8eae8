"""Prompts -> the named conditioning inputs of the two UNet graphs, as the export's manifest says.

The family (CFG or guidance-free, SDXL's added conditioning) and which output of which text encoder
graph the UNet reads are read from ``manifest.json``, never re-derived here, so an SDXL or LCM export
runs through the same loop as SD-1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..contract import limits
from ..contract.errors import UsageError
from .engine import Engine


def time_ids(
    batch: int,
    height: int,
    width: int,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """SDXL's micro-conditioning, as diffusers builds it: original size, crop top-left, target size
    (both sizes default to the generated size), one row per image."""
    row = [*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width))]
    return np.tile(np.asarray([row], np.float32), (batch, 1))


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens of each text without start/end tokens: 0 means nothing the model can read."""
    return [len(tokenizer(t, add_special_tokens=False, truncation=False).input_ids) for t in texts]


def load_tokenizer(root: Path, manifest: mf.Manifest) -> Any:
    """The (first) text encoder's tokenizer of an export."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(root / manifest.text["tokenizer"]))


SIZE_KEYS = ("original_size", "crops_coords_top_left", "target_size")


def check_sizes(sizes: Any) -> None:
    """SDXL's ``sizes``: only the keys :func:`time_ids` takes, each a pair of integers >= 0."""
    if sizes is None:
        return
    if not isinstance(sizes, dict):
        raise UsageError(f"sizes must be a dict with keys among {', '.join(SIZE_KEYS)}, got {type(sizes).__name__}")
    unknown = sorted(str(k) for k in sizes if k not in SIZE_KEYS)
    if unknown:
        raise UsageError(f"sizes has unknown key(s) {', '.join(unknown)}: use {', '.join(SIZE_KEYS)}")
    for key, value in sizes.items():
        if value is None and key != "crops_coords_top_left":
            continue
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise UsageError(f"sizes[{key!r}] must be a pair of integers (height, width or top, left), got {value!r}")
        for v in value:
            limits.check_int(f"sizes[{key!r}]", v, 0)


class TextConditioner:
    """Runs the export's text encoder graph(s) and assembles every conditioning input by name."""

    def __init__(self, root: Path, manifest: mf.Manifest, engines: dict[str, Engine], tokenizer: Any) -> None:
        from transformers import CLIPTokenizer

        self.manifest, self.engines = manifest, engines
        self.encoders = []
        for i, enc in enumerate(manifest.text_encoders):
            tok = tokenizer if i == 0 else CLIPTokenizer.from_pretrained(str(root / enc["tokenizer"]))
            self.encoders.append((enc, tok))

    @property
    def window(self) -> int:
        """Prompt tokens the text encoder reads (its context less the start and end tokens)."""
        return int(self.manifest.text["max_length"]) - 2

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text without start/end tokens: 0 means nothing the model can read."""
        return count_tokens(self.encoders[0][1], texts)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Text states (every encoder's chosen output, concatenated) and the pooled embedding, if any."""
        hidden, pooled = [], None
        for enc, tokenizer in self.encoders:
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=self.manifest.text["max_length"],
                truncation=True,
                return_tensors="np",
            ).input_ids.astype(np.int64)
            engine = self.engines[enc["graph"]]
            out = engine({"input_ids": ids})
            hidden.append(engine.numpy(out[enc["output"]]))
            if enc.get("pooled"):
                pooled = engine.numpy(out[enc["pooled"]])
        return (hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1)), pooled

    def __call__(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        guidance_scale: float,
        height: int,
        width: int,
        sizes: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every conditioning input (host arrays); the graphs take the subset their family names.

        With CFG the text encoders run once on prompts and negatives together (batch 2B, the batch
        the engines are built for). A missing negative prompt is encoded as "" unless the model zeroes
        it (SDXL's ``force_zeros_for_empty_prompt``, as diffusers does).
        """
        family, batch = self.manifest.model, len(prompts)
        texts = prompts + (negatives or [""] * batch) if family.cfg else prompts
        states, pooled = self.encode(texts)
        feeds = {
            mf.PROMPT_EMBEDS: states[:batch],
            mf.GUIDANCE_SCALE: np.array([guidance_scale], np.float32),
        }
        zero = negatives is None and bool(self.manifest.text.get("force_zeros_for_empty_prompt", False))
        if family.cfg:
            feeds[mf.NEGATIVE_PROMPT_EMBEDS] = np.zeros_like(states[batch:]) if zero else states[batch:]
        if family.added_conditioning:
            assert pooled is not None, "the manifest names no pooled output for SDXL's added conditioning"
            ids = time_ids(batch, height, width, **(sizes or {}))
            feeds.update({mf.TEXT_EMBEDS: pooled[:batch], mf.TIME_IDS: ids, mf.NEGATIVE_TIME_IDS: ids})
            if family.cfg:
                feeds[mf.NEGATIVE_TEXT_EMBEDS] = np.zeros_like(pooled[batch:]) if zero else pooled[batch:]
        return feeds
