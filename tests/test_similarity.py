"""Stochastic similarity filter: the rule on its own, then inside the engine (no UNet/VAE on a skip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamnode.diffusion.similarity import SimilarityFilter
from streamnode.diffusion.stream import StreamEngine

SIZE = 64


def test_skip_probability_rule() -> None:
    p = SimilarityFilter.skip_probability
    assert p(0.5, 0.98) == 0.0
    assert p(0.98, 0.98) == 0.0
    assert p(0.99, 0.98) == pytest.approx(0.5)
    assert p(1.0, 0.98) == pytest.approx(1.0)
    assert p(1.0, 1.0) == 1.0 and p(0.999, 1.0) == 0.0


def test_identical_frames_skip_up_to_max_skip_then_refresh() -> None:
    f = SimilarityFilter(threshold=0.9, max_skip=3)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    decisions = [f.should_skip(image) for _ in range(9)]
    assert decisions == [False, True, True, True, False, True, True, True, False]


def test_compares_with_the_last_processed_frame_not_the_last_seen() -> None:
    f = SimilarityFilter(threshold=0.5, max_skip=100)
    base = torch.ones(1, 3, 4, 4)
    f.should_skip(base)
    drift = [base + 0.25 * k * torch.linspace(-1, 1, 48).view(1, 3, 4, 4) for k in range(1, 30)]
    # Each step is small, but the drift from the reference grows until a frame is processed.
    assert not all(f.should_skip(d) for d in drift)


def test_threshold_zero_disables_and_not_allowed_processes() -> None:
    f = SimilarityFilter(threshold=0.0, max_skip=10)
    image = torch.ones(1, 3, 4, 4)
    assert not any(f.should_skip(image) for _ in range(5))
    f.configure(threshold=0.5)
    assert not f.should_skip(image)  # first frame after enabling: the reference
    assert f.should_skip(image)
    assert not f.should_skip(image, allowed=False)
    with pytest.raises(ValueError, match="0..1"):
        f.configure(threshold=float("nan"))


def make_engine(components, **kw) -> StreamEngine:  # noqa: ANN001
    engine = StreamEngine.from_components(
        components, t_index_list=[32], width=SIZE, height=SIZE, cfg_type="self", **kw
    )
    engine.prepare(prompt="a quiet street")
    return engine


def test_static_input_is_mostly_skipped_and_random_frames_are_not(tiny_components) -> None:
    engine = make_engine(tiny_components, similarity_threshold=0.98, similarity_max_skip=10)
    rng = np.random.default_rng(0)
    static = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    n = 221
    first = engine(static)
    for _ in range(n - 1):
        out = engine(static)
        assert np.array_equal(out, first)  # a skipped frame returns the last output
    assert engine.stats["skipped"] / engine.stats["frames"] >= 0.90
    assert engine.stats["unet_calls"] == engine.stats["frames"] - engine.stats["skipped"]
    assert engine.stats["vae_encodes"] == engine.stats["vae_decodes"] == engine.stats["unet_calls"]

    other = make_engine(tiny_components, similarity_threshold=0.98, similarity_max_skip=10)
    for _ in range(60):
        other(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    assert other.stats["skipped"] / other.stats["frames"] < 0.10


def test_a_live_update_is_never_hidden_by_the_filter(tiny_components) -> None:
    engine = make_engine(tiny_components, similarity_threshold=0.98, similarity_max_skip=100,
                         prompt_transition_frames=0)
    static = np.full((SIZE, SIZE, 3), 90, np.uint8)
    engine(static)
    engine(static)
    assert engine.stats["skipped"] == 1
    calls = engine.stats["unet_calls"]
    engine.update(guidance_scale=3.0)
    engine(static)  # processed although it is the same frame
    assert engine.stats["unet_calls"] == calls + 1
    for _ in range(3):
        engine(static)
    assert engine.stats["skipped"] >= 2  # then the filter is back
    engine.update(similarity_threshold=0.0)
    calls = engine.stats["unet_calls"]
    engine(static)
    assert engine.stats["unet_calls"] == calls + 1
