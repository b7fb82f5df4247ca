"""The LCM schedule of the stream batch: timesteps and per-step scalings, computed once.

t_index values address the LCM schedule of 50 train-spaced steps (`LCMScheduler.set_timesteps(50)`):
index 0 is the noisiest timestep (999 for a 1000-step model), index 49 the cleanest (19).
For stage i of the stream batch, with τ_i = timesteps[t_index_list[i]]:

    a_i = sqrt(ᾱ(τ_i))        b_i = sqrt(1 − ᾱ(τ_i))
    c_skip_i, c_out_i         = LCMScheduler.get_scalings_for_boundary_condition_discrete(τ_i)

so that the LCM step of stage i reads x0 = c_out_i·(X − b_i·ε)/a_i + c_skip_i·X.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamnode.live_params import NUM_TRAIN_TIMESTEPS_LCM


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
