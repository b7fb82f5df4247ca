"""test://bars, test://noise, test://moving at a given size and rate."""

from __future__ import annotations

import time

import numpy as np
import pytest

from streamnode.io.base import TransportOptions, open_source


@pytest.mark.parametrize("pattern", ["bars", "noise", "moving"])
def test_patterns_have_the_asked_size(pattern: str) -> None:
    with open_source(f"test://{pattern}?size=40x24", TransportOptions(realtime=False)) as src:
        a = src.read(0.1).copy()
        b = src.read(0.1).copy()
    assert a.shape == (24, 40, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    if pattern == "bars":
        np.testing.assert_array_equal(a, b)
        assert len({tuple(px) for px in a[0]}) == 7
    else:
        assert not np.array_equal(a, b)  # the picture moves


def test_default_size_is_the_output_size() -> None:
    with open_source("test://bars", TransportOptions(width=32, height=16, realtime=False)) as src:
        assert src.read(0.1).shape == (16, 32, 3)


def test_paced_at_fps() -> None:
    with open_source("test://moving?size=16x16&fps=50") as src:
        t0 = time.perf_counter()
        frames = 0
        while time.perf_counter() - t0 < 0.4:
            if src.read(0.05) is not None:
                frames += 1
    assert 15 <= frames <= 25  # 50 fps for 0.4 s
