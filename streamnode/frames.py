"""Frame: the one picture layout inside the node (uint8 H×W×3 RGB, C-contiguous), and RingBuffer."""

from __future__ import annotations

import threading
import time
from collections import deque
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


_FREE, _WRITING, _READY, _HELD = 0, 1, 2, 3


class RingBuffer:
    """Preallocated frame slots between one producer thread and one consumer thread.

    Live mode (`block=False`): `put()` never waits. With no free slot it overwrites the oldest
    frame the consumer has not taken and counts a drop. `get_latest()` hands out the newest
    frame and counts the older unread ones as dropped, so a slow consumer shows the present,
    never a backlog.

    Ordered mode (`block=True`, for `--no-drop` renders): `put()` waits for a free slot instead,
    and `get_next()` hands out every frame in order; nothing is dropped.

    The consumer holds the slot of the frame it was given, and the producer never writes into
    a held slot, so a frame cannot tear while it is read. The frame stays valid until the
    consumer's next successful `get_*()` or `release()`; an empty `get_*()` keeps it.

    Counters are exact: `puts == taken + dropped + pending` at every quiet point.
    """

    def __init__(self, shape: tuple[int, ...], slots: int = 4, *, block: bool = False) -> None:
        if slots < 2:
            raise ValueError(f"a ring buffer needs at least 2 slots (one held, one written), got {slots}")
        self.shape = tuple(shape)
        self.block = block
        self._images = [np.zeros(self.shape, np.uint8) for _ in range(slots)]
        # One Frame per slot, updated in place: handing out a frame allocates nothing.
        self._frames = [Frame(image=img, seq=-1, t_capture=0) for img in self._images]
        self._state = [_FREE] * slots
        self._free = list(range(slots))
        self._ready: deque[int] = deque()
        self._held: int | None = None
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self.puts = 0
        self.taken = 0
        self.dropped = 0

    @property
    def slots(self) -> int:
        return len(self._images)

    @property
    def pending(self) -> int:
        """Frames written and not yet taken."""
        with self._cond:
            return len(self._ready)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        """Closed by the producer and every frame taken: the consumer can stop."""
        with self._cond:
            return self._closed and not self._ready

    # -- producer ------------------------------------------------------------------------

    def put(self, image: np.ndarray, seq: int, t_capture: int, timeout: float | None = None) -> bool:
        """Copy `image` into a slot and publish it.

        Returns False, without copying, when the ring is closed, or (ordered mode only) when no
        slot came free within `timeout`. Live mode never waits.
        """
        with self._cond:
            index = self._claim(timeout)
            if index is None:
                return False
        # Copy outside the lock: the consumer may take another frame meanwhile.
        np.copyto(self._images[index], image)
        frame = self._frames[index]
        frame.seq = seq
        frame.t_capture = t_capture
        with self._cond:
            self._state[index] = _READY
            self._ready.append(index)
            self.puts += 1
            self._cond.notify_all()
        return True

    def _claim(self, timeout: float | None) -> int | None:
        if self.block:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._free and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
        if self._closed:
            return None
        if self._free:
            index = self._free.pop()
        else:
            # Live mode and every unheld slot holds an unread frame: the oldest one goes.
            index = self._ready.popleft()
            self.dropped += 1
        self._state[index] = _WRITING
        return index

    def close(self) -> None:
        """No more frames will come. Waiting consumers wake; frames already written can still be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- consumer ------------------------------------------------------------------------

    def get_latest(self, timeout: float | None = None) -> Frame | None:
        """The newest frame; older unread frames count as dropped. None after `timeout` or at the end."""
        return self._get(timeout, newest=True)

    def get_next(self, timeout: float | None = None) -> Frame | None:
        """The oldest unread frame, so that every frame is seen in order. None after `timeout` or at the end."""
        return self._get(timeout, newest=False)

    def _get(self, timeout: float | None, newest: bool) -> Frame | None:
        with self._cond:
            if not self._ready and not self._closed:
                self._cond.wait_for(lambda: self._ready or self._closed, timeout)
            if not self._ready:
                return None
            if newest:
                index = self._ready.pop()
                while self._ready:
                    self._free_slot(self._ready.popleft())
                    self.dropped += 1
            else:
                index = self._ready.popleft()
            if self._held is not None:
                self._free_slot(self._held)
            self._held = index
            self._state[index] = _HELD
            self.taken += 1
            return self._frames[index]

    def release(self) -> None:
        """Give back the frame last taken (it must not be read afterwards)."""
        with self._cond:
            if self._held is not None:
                self._free_slot(self._held)
                self._held = None

    def _free_slot(self, index: int) -> None:
        self._state[index] = _FREE
        self._free.append(index)
        self._cond.notify_all()
