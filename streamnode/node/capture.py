"""The capture thread: source → fitted frame → ring buffer, and a picture while the source is away.

It opens the source (retrying with backoff), fits each frame to the output size into the ring
buffer, and while the source is away repeats the last frame (black after
`source.lost_timeout_s`) so every sink keeps a picture. State that must survive a restart of
the thread by its guard (the frame counter, the held frame) lives on the object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from streamnode.config import SourceConfig
from streamnode.frames import RingBuffer
from streamnode.io.base import Retry, Source, SourceEnded
from streamnode.io.fit import Fitter
from streamnode.node.sinks import close_quietly

logger = logging.getLogger(__name__)

TICK_S = 0.05


class Capture:
    """Reads `source` into `ring`. Counters and flags are written by the capture thread only."""

    def __init__(self, source: Source, ring: RingBuffer, config: SourceConfig, *, width: int, height: int,
                 fps: float, no_drop: bool, engine_ready: threading.Event,
                 on_frame: Callable[[int, np.ndarray], None] | None = None) -> None:
        self.source = source
        self.ring = ring
        self.config = config
        self.width, self.height = width, height
        self.fps = fps
        self.no_drop = no_drop
        self._engine_ready = engine_ready
        self._on_frame = on_frame  # sees every frame put into the ring (the ControlNet preprocessors)
        self._fitted = np.zeros((height, width, 3), np.uint8)  # also the frame held while the source is away
        self._seq = 0
        self.frames_in = 0  # real frames from the source (not repeats while it is away)
        self.connected = False
        self.holding = False
        self.ended = False

    def run(self, stop: threading.Event) -> None:
        try:
            self._run(stop)
        finally:
            if self.ended or stop.is_set():
                self.ring.close()

    def _run(self, stop: threading.Event) -> None:
        source, cfg, fitted = self.source, self.config, self._fitted
        fit = Fitter(self.width, self.height, cfg.fit)
        retry = Retry(f"source {source.uri}", log=logger)
        is_open = False
        last_real = time.monotonic()
        next_hold = 0.0
        had_frame = False
        black = True
        interval = 1.0 / self.fps
        if self.no_drop:
            # A render reads its input at the engine's pace: frames read while the model loads
            # would only wait in the ring (and show up as seconds of latency).
            while not self._engine_ready.wait(TICK_S):
                if stop.is_set():
                    return
        try:
            while not stop.is_set():
                image = None
                if not is_open and retry.ready():
                    try:
                        source.open()
                        is_open = True
                    except Exception as e:  # noqa: BLE001 - any open failure is retried
                        retry.failed(e)
                        close_quietly(source)
                if is_open:
                    # While holding, wake in time for the next repeat so the output keeps its rate.
                    timeout = min(TICK_S, max(0.001, next_hold - time.monotonic())) if self.holding else TICK_S
                    try:
                        image = source.read(timeout)
                    except SourceEnded:
                        logger.info("%s: end of source", source.uri)
                        self.ended = True
                        return
                    except Exception as e:  # noqa: BLE001 - a read failure means reopen, never crash
                        retry.failed(e)
                        close_quietly(source)
                        is_open = False
                else:
                    stop.wait(min(TICK_S, retry.wait_s(), max(0.001, next_hold - time.monotonic())))
                now = time.monotonic()
                if image is not None:
                    if retry.failing:
                        retry.succeeded()
                    if self.holding:
                        logger.info("%s: frames again after %.1f s", source.uri, now - last_real)
                        self.holding = False
                    fit(image, fitted)
                    last_real, had_frame, black = now, True, False
                    self.connected = True
                    self._seq += 1
                    self.frames_in += 1
                    self._put(stop, fitted)
                elif not self.no_drop and now - last_real >= cfg.hold_after_s and now >= next_hold:
                    # The source is away: keep the sinks fed with the last frame, black after a while.
                    self.connected = False
                    if not self.holding:
                        self.holding = True
                        what = "holding the last frame" if had_frame else "sending black until it comes"
                        logger.warning("%s: no frames for %.1f s; %s", source.uri, now - last_real, what)
                    if not black and now - last_real >= cfg.lost_timeout_s:
                        fitted[:] = 0
                        black = True
                        logger.warning("%s: still no frames after %.3g s; sending black", source.uri,
                                       cfg.lost_timeout_s)
                    # On time: keep the cadence. Far behind (or the first repeat): restart it from now.
                    next_hold = (next_hold if now - next_hold < interval else now) + interval
                    self._seq += 1
                    self._put(stop, fitted)
        finally:
            if is_open:
                close_quietly(source)

    def _put(self, stop: threading.Event, image: np.ndarray) -> None:
        t_capture = time.monotonic_ns()
        if self._on_frame is not None:
            self._on_frame(self._seq, image)
        # Live: never waits. --no-drop: waits for the engine, looking at `stop` meanwhile.
        while not self.ring.put(image, self._seq, t_capture, timeout=TICK_S):
            if stop.is_set() or self.ring.closed:
                return
