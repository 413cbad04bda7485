"""The free-form hole masks of this project (the test set's and the val study's): random-walk brush strokes."""
from __future__ import annotations

import numpy as np

from utils.image import IMAGE_SIZE

HOLE_RATIO = (0.10, 0.40)  # target hole fraction per mask, drawn uniformly (lab sample: ~0.24)


def _brush(r: int) -> np.ndarray:
    """Pixel offsets of a roundish brush of radius r (r=1: 3x3 square, r=2: 5x5 without corners)."""
    offsets = np.argwhere(np.ones((2 * r + 1, 2 * r + 1), bool)) - r
    return offsets[(offsets ** 2).sum(1) <= r * r + r]


_BRUSHES = [_brush(1), _brush(2)]


def stroke_mask(rng: np.random.Generator, size: int = IMAGE_SIZE,
                ratio: tuple[float, float] = HOLE_RATIO) -> np.ndarray:
    """Free-form hole mask (True = hole) like the lab's: random-walk brush strokes with ragged edges.

    Strokes are painted until the hole fraction reaches a target drawn from `ratio` (it overshoots
    by at most one brush stamp). Each stamp drops ~20% of its pixels, which gives the lab's speckle.
    """
    target = rng.uniform(*ratio) * size * size
    hole = np.zeros((size, size), bool)
    count = 0
    while count < target:
        y, x = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        brush = _BRUSHES[rng.integers(len(_BRUSHES))]
        for _ in range(rng.integers(40, 120)):
            angle += rng.normal(0, 0.8)
            ny, nx = y + 2 * np.sin(angle), x + 2 * np.cos(angle)
            if not (0 <= ny < size and 0 <= nx < size):
                angle += np.pi  # bounce off the border instead of smearing along it
                continue
            y, x = ny, nx
            p = brush[rng.random(len(brush)) < 0.8] + (int(y), int(x))
            p = p[((p >= 0) & (p < size)).all(1)]
            count += int((~hole[p[:, 0], p[:, 1]]).sum())
            hole[p[:, 0], p[:, 1]] = True
            if count >= target:
                break
    return hole
