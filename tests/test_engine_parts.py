"""The engine's small parts: LCM schedule, strength mapping, prompt cache and blending."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnode.diffusion.prompts import PromptCache, blend_embeddings, check_weights, slerp
from streamnode.diffusion.schedule import LcmSchedule
from streamnode.live_params import strength_to_t_index, t_index_to_strength


def lcm_scheduler():  # noqa: ANN201
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_schedule_reads_the_lcm_scheduler() -> None:
    scheduler = lcm_scheduler()
    schedule = LcmSchedule.from_scheduler(scheduler, [0, 32, 45, 49])
    assert schedule.timesteps.tolist() == [999, 359, 99, 19]
    acp = scheduler.alphas_cumprod.double()
    assert torch.allclose(schedule.alpha, acp[[999, 359, 99, 19]].sqrt())
    assert torch.allclose(schedule.beta ** 2 + schedule.alpha ** 2, torch.ones(4, dtype=torch.float64))
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(359)
    assert schedule.c_skip[1] == pytest.approx(float(c_skip)) and schedule.c_out[1] == pytest.approx(float(c_out))
    with pytest.raises(ValueError, match="0..49"):
        LcmSchedule.from_scheduler(scheduler, [50])


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("strength", [0.2, 0.25, 0.36, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_strength_picks_the_timesteps_diffusers_picks(steps: int, strength: float) -> None:
    if steps > int(50 * strength):
        pytest.skip("diffusers refuses a schedule shorter than the steps; ours clamps")
    scheduler = lcm_scheduler()
    scheduler.set_timesteps(steps, strength=strength)
    indices = strength_to_t_index(strength, steps)
    assert LcmSchedule.from_scheduler(lcm_scheduler(), indices).timesteps.tolist() == scheduler.timesteps.tolist()


@given(st.floats(0.0, 1.0), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_strength_always_gives_a_valid_t_index_list(strength: float, steps: int) -> None:
    indices = strength_to_t_index(strength, steps)
    assert len(indices) == steps
    assert all(0 <= i <= 49 for i in indices)
    assert all(b > a for a, b in zip(indices, indices[1:], strict=False))
    # At least as strong as asked (to the 1/50 grid); stronger only where T steps need it.
    assert t_index_to_strength(indices) >= strength - 0.02


def test_strength_edges() -> None:
    assert strength_to_t_index(1.0, 1) == [0]
    assert strength_to_t_index(0.0, 2) == [48, 49]
    assert strength_to_t_index(0.58, 1) == [21]  # 0.58·50 = 28.999… must not floor to 28
    with pytest.raises(ValueError):
        strength_to_t_index(float("nan"), 1)


def test_prompt_cache_is_lru_and_counts_encodes() -> None:
    encoded: list[str] = []

    def encode(texts: list[str]) -> torch.Tensor:
        encoded.extend(texts)
        return torch.stack([torch.full((3, 2), float(len(t))) for t in texts])

    cache = PromptCache(encode, maxsize=2)
    a, b = cache.get_many(["a", "bb"])
    assert a.shape == (1, 3, 2) and float(b[0, 0, 0]) == 2.0
    cache.get("a")  # a is now the most recent
    cache.get("ccc")  # evicts bb
    assert "bb" not in cache and "a" in cache and len(cache) == 2
    cache.get_many(["a", "a", "ccc"])
    assert encoded == ["a", "bb", "ccc"] and cache.encodes == 3


def test_linear_blend_is_the_normalised_weighted_mean() -> None:
    e1, e2 = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    assert torch.allclose(blend_embeddings([e1, e2], [1.0, 3.0], "linear"), torch.full((1, 2, 4), 0.75))
    assert blend_embeddings([e1], [5.0], "slerp") is e1


def test_slerp_keeps_the_norm_and_hits_the_endpoints() -> None:
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    v1 = v1 / v1.norm(dim=-1, keepdim=True) * v0.norm(dim=-1, keepdim=True)
    assert torch.allclose(slerp(v0, v1, 0.0), v0, atol=1e-5)
    assert torch.allclose(slerp(v0, v1, 1.0), v1, atol=1e-5)
    mid = slerp(v0, v1, 0.5)
    assert torch.allclose(mid.norm(dim=-1), v0.norm(dim=-1), atol=1e-4)
    assert (torch.nn.functional.cosine_similarity(mid, v0, dim=-1) > 0).all()
    assert torch.allclose(slerp(v0, v0.clone(), 0.3), v0, atol=1e-5)  # parallel: no division by 0
    two = blend_embeddings([v0, v1], [1.0, 1.0], "slerp")
    assert torch.allclose(two, mid, atol=1e-6)


def test_weights_are_checked() -> None:
    assert check_weights([1, 2.5], "w") == [1.0, 2.5]
    for bad in ([], [0.0, 0.0], [-1.0], [float("inf")], ["x"]):
        with pytest.raises(ValueError):
            check_weights(bad, "w")
