"""Rate-limited logging: at most one line per cause per interval, with a count of the rest.

A source that stays away for an hour, a fader that sends a bad value every cook, a garbage
sender on the OSC port: each is one line now and one summary later, never a flood.
"""

from __future__ import annotations

import threading
import time


class LogLimiter:
    """At most one log line per key every `interval` seconds; says how many were held back.

    `max_keys` bounds the memory when keys come from outside (random addresses from a fuzzer).
    Thread-safe.
    """

    def __init__(self, interval: float = 10.0, max_keys: int = 512) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        """None: stay quiet. Otherwise log now; the number is how many lines were held back."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._next) >= self.max_keys:
                self._next.clear()
                self._held.clear()
            self._next[key] = now + self.interval
            return self._held.pop(key, 0)


def held_text(held: int) -> str:
    """" (N similar not logged)" for a line that follows N held-back ones; "" for none."""
    return f" ({held} similar not logged)" if held else ""
