"""A procedural captioned data set: one coloured shape at a named position on a light background.

Real SD weights can't be downloaded here, so the project trains its own small text-to-image model on
this data. Everything is drawn from a seed, so a training run, an evaluation prompt set and the judge's
ground truth are reproducible with nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...contract.errors import UsageError

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 175),
}
SHAPES = ("circle", "square", "triangle")
# Anchor (x, y) of each named position, in pixels of the 64x64 image.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "center": (32.0, 32.0),
}
PREPOSITION = {"left": "on the", "right": "on the", "top": "at the", "bottom": "at the", "center": "in the"}
JITTER = 3.0  # max shift of the centre from its anchor, pixels
HALF_SIZE = (7.0, 11.0)  # half the side of the shape's bounding box, pixels
BACKGROUND = (240, 240, 236)
BACKGROUND_JITTER = 8


@dataclass(frozen=True)
class Spec:
    color: str
    shape: str
    position: str
    cx: float = 0.0
    cy: float = 0.0
    half: float = 9.0
    background: tuple[int, int, int] = BACKGROUND

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.position)


def caption(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} {PREPOSITION[position]} {position}"


def vocabulary() -> list[str]:
    """Every word a caption can use; the word-level tokenizer is built from exactly these."""
    words = {"a", *COLORS, *SHAPES, *POSITIONS}
    for prep in PREPOSITION.values():
        words.update(prep.split())
    return sorted(words)


def sample_spec(rng: np.random.Generator) -> Spec:
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    ax, ay = POSITIONS[position]
    cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
    half = rng.uniform(*HALF_SIZE)
    tint = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    background = tuple(int(np.clip(b + t, 200, 255)) for b, t in zip(BACKGROUND, tint, strict=True))
    return Spec(color, shape, position, float(cx), float(cy), float(half), background)  # type: ignore[arg-type]


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape whose bounding box is ``2*half`` wide at (cx, cy)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex up, base at the bottom of the box: fills half of its box
        inside = (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise UsageError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(spec: Spec, size: int = SIZE) -> np.ndarray:
    """The image of one spec: HxWx3 uint8."""
    cover = shape_mask(spec.shape, spec.cx, spec.cy, spec.half, size)[..., None]
    bg = np.array(spec.background, np.float32)
    fg = np.array(COLORS[spec.color], np.float32)
    return np.round(bg * (1 - cover) + fg * cover).astype(np.uint8)


def batch(seed: int, n: int, empty_fraction: float = 0.0) -> tuple[np.ndarray, list[str], list[Spec]]:
    """``n`` images (NCHW float32 in [-1, 1]) with captions; ``empty_fraction`` of captions are "" for
    classifier-free guidance. The same seed always gives the same batch (training resumes exactly)."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng) for _ in range(n)]
    images = np.stack([render(s) for s in specs]).astype(np.float32) / 127.5 - 1.0
    drop = rng.random(n) < empty_fraction
    captions = ["" if d else s.caption for s, d in zip(specs, drop, strict=True)]
    return images.transpose(0, 3, 1, 2), captions, specs


def prompt_set(seeds_per_prompt: int = 2) -> list[tuple[str, int, Spec]]:
    """The fixed evaluation set: every colour x shape x position, each with fixed seeds (150 by default)."""
    out = []
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                for _ in range(seeds_per_prompt):
                    out.append((caption(color, shape, position), 1000 + len(out), Spec(color, shape, position)))
    return out
