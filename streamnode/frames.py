"""Frame: the one picture layout inside the node (uint8 H×W×3 RGB, C-contiguous)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Frame:
    """One video frame as every layer inside the node sees it.

    `image` is `uint8`, shape `(H, W, 3)`, RGB, C-contiguous. Transports convert to and from
    this at their edge. `seq` counts frames from one source; `t_capture` is
    `time.monotonic_ns()` when the frame entered the node, and travels with the result so the
    end-to-end latency can be measured at the sink.
    """

    image: np.ndarray
    seq: int
    t_capture: int

    @classmethod
    def now(cls, image: np.ndarray, seq: int) -> Frame:
        return cls(image=image, seq=seq, t_capture=time.monotonic_ns())
