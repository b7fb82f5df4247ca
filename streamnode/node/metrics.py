"""What the node measures: capture→sink latency percentiles and frame rates."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

LATENCY_WINDOW = 512  # samples behind the p50/p95
RATE_WINDOW_S = 2.0  # fps is averaged over this long


class LatencyWindow:
    """The last `size` capture→sink latencies; percentiles on demand. Sink threads add to it."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples = np.zeros(size, np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples[self._count % len(self._samples)] = ms
            self._count += 1

    def percentiles(self) -> tuple[float | None, float | None]:
        with self._lock:
            n = min(self._count, len(self._samples))
            if n == 0:
                return None, None
            p50, p95 = np.percentile(self._samples[:n], [50, 95])
        return round(float(p50), 2), round(float(p95), 2)


class RateMeter:
    """Frames per second of a counter, averaged over the last `window` seconds. Any thread may sample."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._points: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.fps = 0.0

    def sample(self, count: int, now: float) -> float:
        with self._lock:
            if self._points and now < self._points[-1][0]:
                return self.fps  # a sample from a thread that read the clock earlier: already covered
            self._points.append((now, count))
            while len(self._points) > 2 and now - self._points[1][0] >= self.window:
                self._points.popleft()
            t0, c0 = self._points[0]
            self.fps = (count - c0) / (now - t0) if now > t0 else 0.0
            return self.fps
