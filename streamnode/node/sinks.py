"""The output side: every sink behind its own mailbox and thread, and the fan-out that fills them.

Each sink has a two-slot `RingBuffer` mailbox (latest wins, so a slow sink never slows the
engine or the other sinks; `--no-drop` renders wait instead) and a thread that sends what the
mailbox holds. A failing sink is closed, reopened with backoff (`io.base.Retry`), and logged once.

`Outputs.publish()` is the fan-out. It has exactly one writer at a time: the engine thread, or
in live mode with frame_buffer_size > 1 the presenter (presenter.py), which then also takes
the bypassed frames. It counts `frames_out` and ends the output at `--max-frames`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamnode.frames import RingBuffer
from streamnode.io.base import Retry, Sink
from streamnode.node.metrics import LatencyWindow

logger = logging.getLogger(__name__)

TICK_S = 0.05


def close_quietly(transport: object) -> None:
    """Close a source or sink; a failure is logged at debug level (closing must go on for the others)."""
    try:
        transport.close()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - closing must go on for the others
        logger.debug("closing %s failed", getattr(transport, "uri", transport), exc_info=True)


@dataclass
class SinkSlot:
    """One sink, its mailbox and counters. `sent` and `errors` are written by its thread only."""

    sink: Sink
    mailbox: RingBuffer
    retry: Retry
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    is_open: bool = False
    sent: int = 0
    errors: int = 0

    @property
    def thread_name(self) -> str:
        return f"sink:{self.sink.uri}"


class Outputs:
    """The sinks, fed by one writer through `publish()`."""

    def __init__(self, slots: list[SinkSlot], *, no_drop: bool, max_frames: int | None,
                 latency: LatencyWindow, aborted: threading.Event) -> None:
        self.slots = slots
        self.no_drop = no_drop
        self.max_frames = max_frames
        self.latency = latency
        self._aborted = aborted  # set when the node stops: a --no-drop writer must not wait for ever
        self.frames_out = 0  # written by the one writer only
        self.complete = threading.Event()  # --max-frames reached

    def publish(self, image: np.ndarray, tag: tuple[int, int]) -> bool:
        """Copy one result frame into every mailbox; False once the output is complete."""
        if self.complete.is_set():
            return False
        seq, t_capture = tag
        for slot in self.slots:
            # Live: latest wins, never waits. --no-drop: waits for the slowest sink.
            while not slot.mailbox.put(image, seq, t_capture, timeout=TICK_S):
                if slot.mailbox.closed or self._aborted.is_set():
                    break
        self.frames_out += 1
        if self.max_frames is not None and self.frames_out >= self.max_frames:
            logger.info("%d frames out: done", self.frames_out)
            self.complete.set()
            return False
        return True

    def publish_all(self, out: np.ndarray, tags: list[tuple[int, int]]) -> bool:
        """Each frame of a result ((H, W, 3), or (n, H, W, 3) with n tags) in turn."""
        for image, tag in zip(out if out.ndim == 4 else (out,), tags, strict=True):
            if not self.publish(image, tag):
                return False
        return True

    def end(self) -> None:
        """No more frames: each sink thread sends what its mailbox holds, then ends."""
        for slot in self.slots:
            slot.mailbox.close()


class SinkWorker:
    """The thread of one sink: takes frames from its mailbox and sends them, reopening on failure.

    A paced sink (a virtual camera: `pace_fps`) gets a frame at least every period, the last one
    again when the engine is slower; a render (--no-drop) sends each frame once instead.
    """

    def __init__(self, slot: SinkSlot, *, no_drop: bool, latency: LatencyWindow) -> None:
        self.slot = slot
        self.no_drop = no_drop
        self.latency = latency
        self._sent_seq = -1

    def run(self, stop: threading.Event) -> None:
        mailbox, sink = self.slot.mailbox, self.slot.sink
        get = mailbox.get_next if self.no_drop else mailbox.get_latest
        interval = 1.0 / sink.pace_fps if sink.pace_fps and not self.no_drop else None
        next_due = time.monotonic()
        last_sent = -1e9
        held = None
        fresh_waiting = False
        try:
            while not stop.is_set():
                if interval is None:
                    frame = get(TICK_S)
                    if frame is None:
                        if mailbox.ended:
                            return
                        continue
                else:
                    fresh = get(min(TICK_S, max(0.0, next_due - time.monotonic())))
                    if fresh is not None:
                        held, fresh_waiting = fresh, True
                    elif mailbox.ended:
                        return  # the output is over: a paced sink must not repeat the last frame for ever
                    now = time.monotonic()
                    # A new frame goes out at once (no added latency) unless the camera took one
                    # less than half a period ago. With nothing new, the last one is repeated on the
                    # camera's clock, after half a period's grace so that an engine running at
                    # about the camera's rate is never overtaken by a repeat (which would delay
                    # its next frame by a whole period).
                    if held is None or not ((fresh_waiting and now - last_sent >= interval / 2) or now >= next_due):
                        continue
                    next_due = now + (1.5 * interval if fresh_waiting else interval)
                    frame, fresh_waiting, last_sent = held, False, now
                self._send(frame)
        finally:
            mailbox.release()

    def _send(self, frame: object) -> None:
        slot, sink = self.slot, self.slot.sink
        if not slot.is_open:
            if not slot.retry.ready():
                return
            try:
                sink.open()
                slot.is_open = True
                slot.retry.succeeded()
            except Exception as e:  # noqa: BLE001 - retried with backoff
                slot.retry.failed(e)
                close_quietly(sink)
                return
        try:
            sink.send(frame)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - a failing sink is reopened, never fatal
            slot.errors += 1
            slot.retry.failed(e)
            close_quietly(sink)
            slot.is_open = False
            return
        slot.sent += 1
        seq, t_capture = frame.seq, frame.t_capture  # type: ignore[attr-defined]
        if seq != self._sent_seq:
            self._sent_seq = seq
            self.latency.add((time.monotonic_ns() - t_capture) / 1e6)


def make_slot(sink: Sink, height: int, width: int, *, no_drop: bool, log: logging.Logger) -> SinkSlot:
    mailbox = RingBuffer((height, width, 3), 2, block=no_drop)
    return SinkSlot(sink, mailbox, Retry(f"sink {sink.uri}", log=log), is_open=True)


Publish = Callable[[np.ndarray, tuple[int, int]], bool]
