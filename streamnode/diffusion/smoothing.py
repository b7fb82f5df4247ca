"""Output smoothing: an exponential blend of each output latent with the previous one (docs/temporal.md).

    y_t = x0_t + α_t·(y_{t−1} − x0_t)          x0_t the stream's finished latent, y_t what is decoded

With motion-aware smoothing α is lowered per latent pixel where the input changed between the
output frame and the one before it: m is the change of the input's mean over the pixel's
block (8×8 image pixels per latent pixel), averaged over the RGB channels, in the [-1, 1] units
of the VAE's input:

    α_t = α·(1 − clamp((m − MOTION_LOW) / (MOTION_HIGH − MOTION_LOW), 0, 1))

Averaging over a block first cancels sensor noise (its block mean moves by σ/8), so noise is
smoothed while a moving performer (a block changing by more than MOTION_HIGH) is not smeared.
Measured on the image, not the latent, the gate means the same for every model. The motion
of an input frame is kept until that frame leaves the stream (T − 1 calls later), so the gate
lines up with the output it belongs to. Only what is decoded is blended: the stream's carried
state, and so `reference()`, are untouched. All buffers are allocated once per (T, F).
"""

from __future__ import annotations

import torch

MOTION_LOW = 0.02
"""Block-mean change (in [-1, 1] units, 1% of the range) below which a pixel counts as still."""
MOTION_HIGH = 0.1
"""Block-mean change (5% of the range, ~13 uint8 levels) above which a pixel counts as moving:
no smoothing there."""


class OutputSmoother:
    """y = lerp(x0, y_prev, α·gate) per frame, gate from the input's frame difference."""

    def __init__(self, latent_shape: tuple[int, int, int], frames: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._shape, self._frames = latent_shape, frames
        self._device, self._dtype = device, dtype
        self.strength = 0.0
        self.motion_aware = True
        self._steps = 0
        F, (C, h, w) = frames, latent_shape
        self._out = torch.zeros((F, C, h, w), device=device, dtype=dtype)
        self._blocks = torch.zeros((F, 3, h, w), device=device, dtype=dtype)  # the input's block means
        self._last_input = torch.zeros((1, 3, h, w), device=device, dtype=dtype)
        self._diff = torch.zeros((F, 3, h, w), device=device, dtype=dtype)
        self._weight = torch.zeros((F, 1, h, w), device=device, dtype=dtype)
        self._motion = torch.zeros((1, F, 1, h, w), device=device, dtype=dtype)
        self._calls = 0  # input calls seen since reset
        self._has_out = False

    def configure(self, *, strength: float, motion_aware: bool, steps: int) -> None:
        if strength > 0.0 and not self.active:
            self.reset()  # switched on: start from the next output, not from a stale one
        self.strength, self.motion_aware = strength, motion_aware
        if steps != self._steps:
            # One motion map per call in flight: the one a frame made is read when it leaves.
            self._steps = steps
            F, (_, h, w) = self._frames, self._shape
            self._motion = torch.zeros((steps, F, 1, h, w), device=self._device, dtype=self._dtype)
            self._calls = 0

    @property
    def active(self) -> bool:
        return self.strength > 0.0

    def reset(self) -> None:
        """A new stream: the next output is not blended with anything."""
        self._calls = 0
        self._has_out = False

    def observe(self, image: torch.Tensor) -> None:
        """This call's input frames (F, 3, H, W) in [-1, 1]: their motion maps, kept until they leave."""
        slot = self._motion[self._calls % self._steps]
        F, _, H, W = image.shape
        h, w = self._shape[1:]
        # Block means at the latent's resolution: (F, 3, h, H/h, w, W/w) averaged over the blocks.
        torch.mean(image.unflatten(2, (h, H // h)).unflatten(4, (w, W // w)), dim=(3, 5), out=self._blocks)
        z = self._blocks
        if self._calls == 0:
            self._last_input.copy_(z[:1])
        # Frame f against frame f − 1 (the first against the previous call's last).
        torch.sub(z[:1], self._last_input, out=self._diff[:1])
        if z.shape[0] > 1:
            torch.sub(z[1:], z[:-1], out=self._diff[1:])
        torch.mean(self._diff.abs_(), dim=1, keepdim=True, out=slot)
        self._last_input.copy_(z[-1:])
        self._calls += 1

    def __call__(self, x0: torch.Tensor, *, with_input: bool) -> torch.Tensor:
        """The smoothed output latents (F, C, h, w), in the smoother's own buffer (x0 is not changed)."""
        if not self._has_out:
            self._out.copy_(x0)
            self._has_out = True
            return self._out
        weight = self._weight
        if self.motion_aware and with_input and self._calls > 0:
            # The leaving frames entered T − 1 calls ago: their motion map is the oldest in flight.
            leaving = self._motion[(self._calls - self._steps) % self._steps]
            torch.sub(leaving, MOTION_LOW, out=weight)
            weight.mul_(-1.0 / (MOTION_HIGH - MOTION_LOW)).add_(1.0).clamp_(0.0, 1.0).mul_(self.strength)
        else:
            weight.fill_(self.strength)
        previous = self._out
        for f in range(self._frames):
            # Frames of one call in order: frame f blends with frame f − 1's output.
            before = previous[self._frames - 1 : self._frames] if f == 0 else self._out[f - 1 : f]
            torch.lerp(x0[f : f + 1], before, weight[f : f + 1], out=self._out[f : f + 1])
        return self._out
