"""Hole masks: box holes are one rectangle of the given side range inside the image; the val holes of each kind
are fixed by their seed (the val study's stroke holes unchanged), and the first n do not depend on n."""
from __future__ import annotations

import numpy as np
import pytest

from utils.masks import BOX_SIDE, HOLE_SEEDS, box_mask, fixed_holes, stroke_mask


def test_box_mask_is_one_rectangle_of_the_side_range_inside_the_image():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(300):
        hole = box_mask(rng)
        ys, xs = np.nonzero(hole)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert hole.shape == (64, 64) and hole.sum() == h * w  # filled rectangle, nothing outside it
        sides += [h, w]
    assert min(sides) == BOX_SIDE[0] and max(sides) == BOX_SIDE[1]


def test_fixed_holes_are_fixed_by_the_seed_and_prefix_stable():
    for kind in ("stroke", "box"):
        a, b = fixed_holes(kind, 6), fixed_holes(kind, 3)
        assert a.shape == (6, 64, 64) and a.dtype == bool
        assert np.array_equal(a[:3], b) and np.array_equal(a, fixed_holes(kind, 6))
        assert 0.05 < a.mean() < 0.45
    assert not np.array_equal(fixed_holes("stroke", 2), fixed_holes("box", 2))
    assert fixed_holes("box", 0).shape == (0, 64, 64)


def test_test_split_boxes_are_their_own_and_test_strokes_are_not_drawn():
    """The test split's box holes come from their own seed (not val's); its strokes are the prepared masks."""
    assert not np.array_equal(fixed_holes("box", 4, "test"), fixed_holes("box", 4, "val"))
    assert np.array_equal(fixed_holes("box", 4, "test"), fixed_holes("box", 4, "test"))
    with pytest.raises(ValueError, match="prepared test set"):
        fixed_holes("stroke", 2, "test")


def test_val_stroke_holes_are_the_val_studys():
    """README's val study drew stroke_mask from default_rng(12345) image after image: the same holes."""
    rng = np.random.default_rng(HOLE_SEEDS["val", "stroke"])
    assert HOLE_SEEDS["val", "stroke"] == 12345
    assert np.array_equal(fixed_holes("stroke", 4), np.stack([stroke_mask(rng) for _ in range(4)]))


def test_unknown_hole_kind_is_refused():
    with pytest.raises(ValueError, match="unknown hole kind 'circle'"):
        fixed_holes("circle", 2)
