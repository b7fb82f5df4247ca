"""Output smoothing: an exponential blend of each output latent with the previous one (docs/temporal.md).

    y_t = x0_t + α_t·(y_{t−1} − x0_t)          x0_t the stream's finished latent, y_t what is decoded

With motion-aware smoothing α is lowered per latent pixel where the input moved (m, the motion
map of the output's own input frame, motion.py):

    α_t = α·(1 − clamp((m − MOTION_LOW) / (MOTION_HIGH − MOTION_LOW), 0, 1))

so sensor noise is smoothed while a moving performer (a block changing by more than
MOTION_HIGH) is not smeared. The engine hands in the map of the frames that leave the stream
(stage T − 1, motion.py keeps it until then), so the gate lines up with the output it belongs
to. Only what is decoded is blended: the stream's carried state, and so `reference()`, are
untouched. All buffers are allocated once per F.
"""

from __future__ import annotations

import torch

from streamnode.diffusion.motion import MOTION_HIGH, MOTION_LOW


class OutputSmoother:
    """y = lerp(x0, y_prev, α·gate) per frame, gate from the input's motion."""

    def __init__(self, latent_shape: tuple[int, int, int], frames: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._frames = frames
        self.strength = 0.0
        self.motion_aware = True
        F, (C, h, w) = frames, latent_shape
        self._out = torch.zeros((F, C, h, w), device=device, dtype=dtype)
        self._weight = torch.zeros((F, 1, h, w), device=device, dtype=dtype)
        self._has_out = False

    def configure(self, *, strength: float, motion_aware: bool) -> None:
        if strength > 0.0 and not self.active:
            self.reset()  # switched on: start from the next output, not from a stale one
        self.strength, self.motion_aware = strength, motion_aware

    @property
    def active(self) -> bool:
        return self.strength > 0.0

    @property
    def wants_motion(self) -> bool:
        return self.active and self.motion_aware

    def reset(self) -> None:
        """A new stream: the next output is not blended with anything."""
        self._has_out = False

    def __call__(self, x0: torch.Tensor, *, motion: torch.Tensor | None) -> torch.Tensor:
        """The smoothed output latents (F, C, h, w), in the smoother's own buffer (x0 is not changed).

        motion: (F, 1, h, w), the motion map of x0's input frames (motion.py), or None (no input,
        or motion-unaware): α everywhere."""
        if not self._has_out:
            self._out.copy_(x0)
            self._has_out = True
            return self._out
        weight = self._weight
        if self.motion_aware and motion is not None:
            torch.sub(motion, MOTION_LOW, out=weight)
            weight.mul_(-1.0 / (MOTION_HIGH - MOTION_LOW)).add_(1.0).clamp_(0.0, 1.0).mul_(self.strength)
        else:
            weight.fill_(self.strength)
        previous = self._out
        for f in range(self._frames):
            # Frames of one call in order: frame f blends with frame f − 1's output.
            before = previous[self._frames - 1 : self._frames] if f == 0 else self._out[f - 1 : f]
            torch.lerp(x0[f : f + 1], before, weight[f : f + 1], out=self._out[f : f + 1])
        return self._out
