"""The input's motion per latent pixel, for every frame still in the stream (docs/temporal.md).

    m = mean over RGB of |Δ block mean|       the change of the input's mean over the latent
                                              pixel's block (8×8 image pixels), frame against
                                              frame before it, in the [-1, 1] units of the VAE's input

Averaging over a block first cancels sensor noise (its block mean moves by σ/8), so m stays
near 0 on a still scene with a noisy camera and rises where something really moves. Measured on
the image, not the latent, it means the same for every model.

A frame entering the stream now is at stage k k calls later, so the maps of the last T calls
are kept, stage by stage: `of_stage(k)` is the motion of the frames at stage k of this call
(smoothing gates the leaving frames, stage T − 1; the feature bank forgets, per stage row,
where that row's frame moved). All buffers are allocated once per (T, F); a frame allocates
nothing.
"""

from __future__ import annotations

import torch

MOTION_LOW = 0.02
"""Block-mean change (in [-1, 1] units, 1% of the range) below which a pixel counts as still."""
MOTION_HIGH = 0.1
"""Block-mean change (5% of the range, ~13 uint8 levels) above which a pixel counts as moving:
smoothing stands aside there and the feature bank forgets it."""


class InputMotion:
    """Motion maps (F, 1, h, w) of the input frames of the last T calls, newest (stage 0) first."""

    def __init__(self, latent_hw: tuple[int, int], frames: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self._hw, self._frames = latent_hw, frames
        self._device, self._dtype = device, dtype
        F, (h, w) = frames, latent_hw
        self._blocks = torch.zeros((F, 3, h, w), device=device, dtype=dtype)  # the input's block means
        self._last_input = torch.zeros((1, 3, h, w), device=device, dtype=dtype)
        self._diff = torch.zeros((F, 3, h, w), device=device, dtype=dtype)
        self._steps = 0
        self._ring = torch.zeros((0,), device=device, dtype=dtype)
        self._newest = 0
        self._calls = 0  # calls observed since reset
        self._row_maps: torch.Tensor | None = None
        self.configure(steps=1)

    def configure(self, *, steps: int) -> None:
        """T stages in flight (a new T restarts the history)."""
        if steps == self._steps:
            return
        self._steps = steps
        # Each map is written twice, at i and i + T, so the T newest are always one contiguous
        # window (stage 0 … T − 1 in order) whatever the ring's position: no copy, no index.
        h, w = self._hw
        self._ring = torch.zeros((2 * steps, self._frames, 1, h, w), device=self._device, dtype=self._dtype)
        self._newest = 0
        self._calls = 0

    def reset(self) -> None:
        """A new stream, or calls went by unobserved: the next frame has no earlier one (costs nothing)."""
        self._calls = 0

    def observe(self, image: torch.Tensor) -> None:
        """This call's input frames (F, 3, H, W) in [-1, 1]: their maps become stage 0's."""
        T = self._steps
        if self._calls == 0:
            self._ring.zero_()  # the frames before the first one: unknown, taken as still
        self._newest = (self._newest - 1) % T
        slot = self._ring[self._newest]
        F, _, H, W = image.shape
        h, w = self._hw
        # Block means at the latent's resolution: (F, 3, h, H/h, w, W/w) averaged over the blocks.
        torch.mean(image.unflatten(2, (h, H // h)).unflatten(4, (w, W // w)), dim=(3, 5), out=self._blocks)
        z = self._blocks
        if self._calls == 0:
            self._last_input.copy_(z[:1])
        # Frame f against frame f − 1 (the first against the previous call's last).
        torch.sub(z[:1], self._last_input, out=self._diff[:1])
        if F > 1:
            torch.sub(z[1:], z[:-1], out=self._diff[1:])
        torch.mean(self._diff.abs_(), dim=1, keepdim=True, out=slot)
        self._ring[self._newest + T].copy_(slot)
        self._last_input.copy_(z[-1:])
        self._calls += 1

    def stages(self) -> torch.Tensor:
        """(T, F, 1, h, w): the motion of the frames at each stage of this call (a view)."""
        return self._ring[self._newest : self._newest + self._steps]

    def of_stage(self, stage: int) -> torch.Tensor:
        """(F, 1, h, w): the motion of the frames at `stage` (they entered `stage` calls ago)."""
        return self._ring[self._newest + stage]

    def of_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, 1, h, w): per UNet row the motion of its frame; positions[r] = k·F + f, the
        row's stage k and frame f. In a buffer of the engine's (reallocated only for new rows)."""
        rows = positions.shape[0]
        if self._row_maps is None or self._row_maps.shape[0] != rows:
            self._row_maps = torch.empty((rows, 1, *self._hw), device=self._device, dtype=self._dtype)
        return torch.index_select(self.stages().flatten(0, 1), 0, positions, out=self._row_maps)
