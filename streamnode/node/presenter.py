"""Live mode with `frame_buffer_size` F > 1: one engine call's F results spread over the call period.

Handed to the sinks' latest-wins mailboxes back to back, a sink would see only the last of each
group. The presenter is then the only writer of the sink mailboxes (`Outputs` has one writer by
contract): the engine thread `submit()`s each group, and bypassed input frames as groups of one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

TICK_S = 0.05


class GroupPresenter:
    """Shows frame k of the newest group at t_group + k·period/n, period being the smoothed time
    between groups. A newer group replaces what is left of an older one: live output shows the
    present. `submit()` copies the group into the back buffer, so the engine may reuse its arrays.
    `publish(image, tag)` returns False when the output is complete (--max-frames): then the
    presenter stops showing.
    """

    def __init__(self, frames: int, height: int, width: int,
                 publish: Callable[[np.ndarray, tuple[int, int]], bool]) -> None:
        self._buffers = [np.zeros((frames, height, width, 3), np.uint8) for _ in range(2)]
        self._front = 0
        self._tags: list[tuple[int, int]] = []
        self._next = 0  # index in the front group of the next frame to show
        self._t_group = 0.0
        self._period = 0.0
        self._publish = publish
        self._cond = threading.Condition()

    def submit(self, out: np.ndarray, tags: list[tuple[int, int]]) -> None:
        """A group of len(tags) frames ((n, H, W, 3), or one (H, W, 3) frame with one tag)."""
        group = out if out.ndim == 4 else out[None]
        with self._cond:
            back = 1 - self._front
            np.copyto(self._buffers[back][: len(tags)], group[: len(tags)])
            now = time.monotonic()
            if self._t_group:
                gap = now - self._t_group
                self._period = gap if not self._period else 0.8 * self._period + 0.2 * gap
            self._t_group = now
            self._front, self._tags, self._next = back, list(tags), 0
            self._cond.notify()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if self._next >= len(self._tags):
                    self._cond.wait(TICK_S)
                    continue
                k = self._next
                wait = self._t_group + k * self._period / len(self._tags) - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, TICK_S))  # woken early by a newer group
                    continue
                self._next += 1
                # Under the lock: the engine cannot swap buffers mid-copy. Live mailboxes never wait.
                if not self._publish(self._buffers[self._front][k], self._tags[k]):
                    return
