"""The LCM schedule of the stream batch: timesteps and per-step scalings, computed once.

t_index values address the LCM schedule of 50 train-spaced steps (`LCMScheduler.set_timesteps(50)`):
index 0 is the noisiest timestep (999 for a 1000-step model), index 49 the cleanest (19).
For stage i of the stream batch, with τ_i = timesteps[t_index_list[i]]:

    a_i = sqrt(ᾱ(τ_i))        b_i = sqrt(1 − ᾱ(τ_i))
    c_skip_i, c_out_i         = LCMScheduler.get_scalings_for_boundary_condition_discrete(τ_i)

so that the LCM step of stage i reads x0 = c_out_i·(X − b_i·ε)/a_i + c_skip_i·X.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from streamnode.config import NUM_TRAIN_TIMESTEPS_LCM


@dataclass(frozen=True)
class LcmSchedule:
    """Per-stage scalars for one t_index_list, as float64 CPU tensors of shape (T,)."""

    t_index_list: tuple[int, ...]
    timesteps: torch.Tensor  # (T,) long
    alpha: torch.Tensor  # a_i = sqrt(ᾱ(τ_i))
    beta: torch.Tensor  # b_i = sqrt(1 − ᾱ(τ_i))
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    @classmethod
    def from_scheduler(cls, scheduler: Any, t_index_list: list[int] | tuple[int, ...]) -> LcmSchedule:
        """Read τ_i, ᾱ(τ_i) and the boundary scalings from a diffusers `LCMScheduler`.

        The scheduler is configured here (`set_timesteps(50)`) and not used afterwards: the
        engine applies the step itself, batched over stages, with these precomputed scalars.
        """
        indices = tuple(int(i) for i in t_index_list)
        if not indices or any(not 0 <= i < NUM_TRAIN_TIMESTEPS_LCM for i in indices):
            raise ValueError(f"t_index_list {list(indices)}: every index must be in 0..{NUM_TRAIN_TIMESTEPS_LCM - 1}")
        scheduler.set_timesteps(NUM_TRAIN_TIMESTEPS_LCM)
        all_timesteps = scheduler.timesteps.cpu().long()
        timesteps = all_timesteps[list(indices)]
        alphas_cumprod = scheduler.alphas_cumprod.cpu().double()[timesteps]
        scalings = [scheduler.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]
        return cls(
            t_index_list=indices,
            timesteps=timesteps,
            alpha=alphas_cumprod.sqrt(),
            beta=(1.0 - alphas_cumprod).sqrt(),
            c_skip=torch.tensor([float(s) for s, _ in scalings], dtype=torch.float64),
            c_out=torch.tensor([float(o) for _, o in scalings], dtype=torch.float64),
        )


def strength_to_t_index(strength: float, steps: int) -> list[int]:
    """`strength` in [0, 1] and T steps → the t_index_list of the same timesteps diffusers picks.

    It is the img2img meaning of strength: the fraction of the 50-step schedule the frame goes
    through. With L = floor(50·strength) (at least T), the indices are

        t_index_i = 50 − L + floor(i·L / T),   i = 0..T−1

    which are exactly the timesteps of `LCMScheduler.set_timesteps(T, strength=strength)`.
    strength 1 starts from pure noise (index 0, the input is ignored); strength 0.36 with T = 2
    gives [32, 41]; a strength below T/50 clamps to the gentlest schedule [50 − T, …, 49].
    """
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength = {strength!r} is not valid: must be a number in 0..1")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS_LCM:
        raise ValueError(f"steps = {steps}: must be in 1..{NUM_TRAIN_TIMESTEPS_LCM}")
    n = NUM_TRAIN_TIMESTEPS_LCM
    # The epsilon keeps 0.58·50 = 28.999… from flooring to 28.
    span = max(steps, math.floor(n * strength + 1e-9))
    return [n - span + (i * span) // steps for i in range(steps)]


def t_index_to_strength(t_index_list: list[int] | tuple[int, ...]) -> float:
    """The strength whose schedule starts at t_index_list[0]: (50 − t_index_list[0]) / 50."""
    return (NUM_TRAIN_TIMESTEPS_LCM - int(t_index_list[0])) / NUM_TRAIN_TIMESTEPS_LCM
