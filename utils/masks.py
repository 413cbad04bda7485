"""The hole masks of this project: free-form random-walk brush strokes (the test set's and the val study's) and
axis-aligned boxes (a second hole type, where a whole region is missing, not only thin strokes).

`fixed_holes` draws the holes of one kind for a split from a fixed seed, so every tool that scores on them
(experiments.py --split val / --holes boxes, the GPU campaign and its scorer) sees the same holes. The test split's
stroke holes are not drawn here: they are the prepared test set's masks (prepare_dataset.py)."""
from __future__ import annotations

import numpy as np

from utils.image import IMAGE_SIZE

HOLE_RATIO = (0.10, 0.40)  # target hole fraction per mask, drawn uniformly (lab sample: ~0.24)
BOX_SIDE = (16, 36)  # box side lengths in pixels, each drawn uniformly (inclusive): 6-32 % of a 64x64 image
# the drawn holes of each (split, kind); any fixed seeds other than the test set's (prepare_dataset --seed 0). The
# val stroke seed is the one the val study in the README used.
HOLE_SEEDS = {("val", "stroke"): 12345, ("val", "box"): 23456, ("test", "box"): 34567}


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


def box_mask(rng: np.random.Generator, size: int = IMAGE_SIZE, side: tuple[int, int] = BOX_SIDE) -> np.ndarray:
    """One axis-aligned rectangular hole (True = hole), height and width drawn from `side`, placed uniformly inside
    the image."""
    h, w = rng.integers(side[0], side[1] + 1, size=2)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    hole = np.zeros((size, size), bool)
    hole[y:y + h, x:x + w] = True
    return hole


HOLE_KINDS = {"stroke": stroke_mask, "box": box_mask}


def fixed_holes(kind: str, n: int, split: str = "val", size: int = IMAGE_SIZE) -> np.ndarray:
    """The holes (True = hole) of the first `n` images of `split` for one kind of HOLE_KINDS, bool [n, size, size],
    drawn from HOLE_SEEDS[split, kind]: the same holes on every machine and in every tool; image i's hole does not
    depend on n."""
    if kind not in HOLE_KINDS:
        raise ValueError(f"unknown hole kind {kind!r}; choose one of {', '.join(HOLE_KINDS)}")
    if (split, kind) not in HOLE_SEEDS:
        raise ValueError(f"no drawn {kind} holes for the {split} split (the test strokes are the prepared test set's "
                         f"masks)")
    rng = np.random.default_rng(HOLE_SEEDS[split, kind])
    draw = HOLE_KINDS[kind]
    return np.stack([draw(rng, size) for _ in range(n)]) if n else np.zeros((0, size, size), bool)
