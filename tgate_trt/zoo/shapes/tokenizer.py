"""A word-level ``CLIPTokenizer`` for the shapes vocabulary.

CLIP's tokenizer is byte-pair encoding: a word becomes one token only if the merges build it. Learning
the merges from the vocabulary itself (most frequent pair first, as BPE training does) makes every
caption word a single token, while any other text still tokenizes, character by character, so the
result is an ordinary ``CLIPTokenizer`` that the export and runtime load like SD's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ...families import clip_tokenizer

MAX_LENGTH = 16  # longest caption is 8 tokens with start/end


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first (ties broken alphabetically), until every word is one symbol."""
    segs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs):
        counts = Counter(pair for s in segs for pair in zip(s, s[1:], strict=False))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = []
        for s in segs:
            out: list[str] = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        segs = merged
    return merges


def word_tokenizer(folder: Path, words: list[str]) -> Any:
    """The shapes tokenizer, written into ``folder``: CLIP's byte characters plus the merges that make each
    of ``words`` one token (:func:`~tgate_trt.families.clip_tokenizer`, the project's one tokenizer builder)."""
    return clip_tokenizer(folder, learn_merges(words), max_length=MAX_LENGTH)
