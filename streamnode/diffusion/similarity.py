"""Stochastic similarity filter: skip frames that look like the last processed one.

With c the cosine similarity between the incoming frame and the last processed frame (both
as images centred on 0, i.e. in [-1, 1]) and η the threshold:

    p_skip = max(0, (c − η) / (1 − η))

A frame is skipped when a uniform draw u < p_skip, at most `max_skip` times in a row. The
draw makes the filter degrade smoothly: a frame slightly above the threshold is still
processed now and then, so slow drifts reach the output. A skipped frame costs one dot
product; the caller returns its last output without touching the UNet, the VAE or the
stream buffer.
"""

from __future__ import annotations

import logging
import math
import random

import torch

logger = logging.getLogger(__name__)


class SimilarityFilter:
    """Decides, per frame, whether to skip it. `threshold` 0 disables the filter."""

    def __init__(self, threshold: float = 0.98, max_skip: int = 10, seed: int = 0) -> None:
        self.threshold = 0.0
        self.max_skip = 0
        self.configure(threshold, max_skip)
        self._rng = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._skipped_in_a_row = 0
        self.last_similarity: float | None = None

    def configure(self, threshold: float | None = None, max_skip: int | None = None) -> None:
        if threshold is not None:
            if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(f"similarity_threshold = {threshold!r}: must be in 0..1 (0 disables)")
            self.threshold = float(threshold)
        if max_skip is not None:
            if int(max_skip) < 0:
                raise ValueError(f"similarity_max_skip = {max_skip!r}: must be ≥ 0")
            self.max_skip = int(max_skip)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0 and self.max_skip > 0

    def reset(self) -> None:
        """Forget the reference frame: the next frame is processed."""
        self._reference = None
        self._skipped_in_a_row = 0

    @staticmethod
    def skip_probability(similarity: float, threshold: float) -> float:
        if threshold >= 1.0:
            return 1.0 if similarity >= 1.0 else 0.0
        return max(0.0, (similarity - threshold) / (1.0 - threshold))

    def should_skip(self, image: torch.Tensor, allowed: bool = True) -> bool:
        """True: skip this frame. False: process it (it becomes the new reference).

        `image` is the preprocessed frame batch (any shape, values centred on 0). With
        `allowed` False the frame is processed whatever its similarity (the engine says so
        while a parameter change is still flowing through the stream).
        """
        if not self.enabled:
            # A reference kept while disabled would be stale when the filter comes back on.
            self._reference = None
            return False
        if not allowed or self._reference is None or self._reference.shape != image.shape:
            self._remember(image)
            return False
        a, b = image.reshape(-1).float(), self._reference.reshape(-1).float()
        # One fused reduction for the three sums would not be cheaper: these are three dots.
        similarity = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12))
        self.last_similarity = similarity
        if self._skipped_in_a_row < self.max_skip:
            p = self.skip_probability(similarity, self.threshold)
            if p > 0.0 and self._rng.random() < p:
                self._skipped_in_a_row += 1
                return True
        self._remember(image)
        return False

    def _remember(self, image: torch.Tensor) -> None:
        self._skipped_in_a_row = 0
        if self._reference is None or self._reference.shape != image.shape:
            self._reference = image.detach().clone()
        else:
            self._reference.copy_(image)
