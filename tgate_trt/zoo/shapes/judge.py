"""A deterministic judge for ``shapes`` images: which colour, which shape, where.

No learned model: the background is the border's median colour; the object is every pixel far from it,
labelled with the nearest palette colour, and the dominant label is the colour. The centroid of that
colour's pixels names the position (nearest anchor), and how much of its bounding box it fills names the
shape: a triangle (apex up) holds only a quarter of its pixels in the top half of its box, while a
circle and a square hold half; of those two, a square fills its box (~1) and a circle ~pi/4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...contract.errors import UsageError
from .data import COLORS, POSITIONS, Spec

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as object
MIN_PIXELS = 12  # fewer object pixels than this: nothing was drawn
TRIANGLE_MAX_TOP = 0.4  # share of pixels in the box's top half: triangle 0.25, circle and square 0.5
CIRCLE_MAX_FILL = 0.9  # between a circle's pi/4 and a square's 1


@dataclass(frozen=True)
class Verdict:
    color: str | None
    shape: str | None
    position: str | None
    fill: float  # share of the bounding box covered
    top: float  # share of the object's pixels in the top half of the box
    pixels: int

    def score(self, spec: Spec) -> dict[str, bool]:
        return {
            "color": self.color == spec.color,
            "shape": self.shape == spec.shape,
            "position": self.position == spec.position,
        }


def judge(image: np.ndarray) -> Verdict:
    """Judge one HxWx3 uint8 image."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise UsageError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(img - background, axis=-1) > FOREGROUND_DISTANCE
    if foreground.sum() < MIN_PIXELS:
        return Verdict(None, None, None, 0.0, 0.0, int(foreground.sum()))
    palette = np.array(list(COLORS.values()), np.float32)
    labels = np.linalg.norm(img[foreground][:, None, :] - palette[None], axis=-1).argmin(axis=1)
    dominant = int(np.bincount(labels, minlength=len(palette)).argmax())
    mask = np.zeros((h, w), bool)
    mask[foreground] = labels == dominant
    ys, xs = np.nonzero(mask)
    scale = 64.0 / np.array([w, h])  # anchors are in 64x64 pixels
    cx, cy = (xs.mean() + 0.5) * scale[0], (ys.mean() + 0.5) * scale[1]
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    # Bounding box from percentiles so a few stray pixels don't inflate it.
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    box = (x1 - x0 + 1) * (y1 - y0 + 1)
    inside = mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum()
    fill = float(inside / box)
    top = float((ys < (y0 + y1) / 2).mean())
    shape = "triangle" if top < TRIANGLE_MAX_TOP else "circle" if fill < CIRCLE_MAX_FILL else "square"
    return Verdict(list(COLORS)[dominant], shape, position, fill, top, int(mask.sum()))


def accuracy(images: list[np.ndarray], specs: list[Spec]) -> dict[str, float]:
    """Fraction of images judged right on colour, shape, position, and on all three."""
    scores = [judge(img).score(spec) for img, spec in zip(images, specs, strict=True)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "position")}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out
