"""Fitting sources of any size to the output: cover, contain, stretch — in place."""

from __future__ import annotations

import numpy as np
import pytest

from streamnode.io.fit import Fitter


def quadrants(h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255  # left half red
    img[:, w // 2 :, 2] = 255  # right half blue
    return img


def test_same_size_is_a_copy() -> None:
    src = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    out = np.zeros_like(src)
    assert Fitter(64, 32)(src, out) is out
    np.testing.assert_array_equal(out, src)


def test_cover_crops_the_long_side() -> None:
    src = np.zeros((40, 160, 3), np.uint8)  # 4:1 into 1:1: only the middle quarter survives
    src[:, 60:100] = 200
    out = np.zeros((32, 32, 3), np.uint8)
    Fitter(32, 32, "cover")(src, out)
    assert out.min() > 150  # all of it came from the middle


def test_contain_letterboxes_with_black_every_time() -> None:
    src = np.full((20, 80, 3), 255, np.uint8)  # 4:1 into 1:1: bars above and below
    out = np.full((32, 32, 3), 77, np.uint8)  # a slot that held another frame
    Fitter(32, 32, "contain")(src, out)
    assert out[:12].max() == 0 and out[-12:].max() == 0
    assert out[13:19].min() == 255
    tall = np.full((80, 20, 3), 255, np.uint8)
    out[:] = 77
    Fitter(32, 32, "contain")(tall, out)
    assert out[:, :12].max() == 0 and out[:, -12:].max() == 0 and out[:, 13:19].min() == 255


def test_stretch_keeps_everything() -> None:
    src = quadrants(40, 160)
    out = np.zeros((32, 32, 3), np.uint8)
    Fitter(32, 32, "stretch")(src, out)
    assert out[:, :15, 0].min() == 255 and out[:, 17:, 2].min() == 255


def test_size_changes_are_followed_and_unknown_modes_refused() -> None:
    fit = Fitter(16, 16, "cover")
    out = np.zeros((16, 16, 3), np.uint8)
    for shape in [(48, 64, 3), (64, 48, 3), (8, 8, 3)]:
        fit(np.full(shape, 9, np.uint8), out)
        assert out.min() == out.max() == 9
    with pytest.raises(ValueError, match="cover, contain, stretch"):
        Fitter(16, 16, "zoom")  # type: ignore[arg-type]
