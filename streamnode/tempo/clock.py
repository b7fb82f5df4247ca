"""The clock protocol and the internal free-running BPM clock.

A clock maps a time (seconds on `time.monotonic()`) to a musical `Position`: the beat count,
the tempo, the bar. Every clock is asked with an explicit time, so the quantizer can ask "which
beat will it be when this frame leaves the node" (now + the measured latency) and a test can
ask about any time at all without sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

MIN_BPM, MAX_BPM = 20.0, 999.0
"""Tempo range every clock accepts (Link's own is 20..999)."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where the music is at one instant. `beat` counts from the clock's origin (beat 0 is a
    downbeat); it does not move while the clock is stopped."""

    beat: float
    bpm: float
    beats_per_bar: int = 4
    playing: bool = True

    @property
    def bar(self) -> int:
        """The bar number (0 at the origin)."""
        return math.floor(self.beat / self.beats_per_bar)

    @property
    def beat_in_bar(self) -> int:
        """0..beats_per_bar−1: which beat of its bar."""
        return math.floor(self.beat) % self.beats_per_bar

    @property
    def phase(self) -> float:
        """0..1: how far into the bar (Link's phase over its quantum, divided by the quantum)."""
        return (self.beat / self.beats_per_bar) % 1.0

    def seconds_to(self, beat: float) -> float:
        """Seconds from this position until `beat` at the current tempo (negative: already past)."""
        return (beat - self.beat) * 60.0 / self.bpm


@runtime_checkable
class Clock(Protocol):
    """A source of musical time. `at(t)` is cheap (no I/O, no lock held long): the engine thread
    asks it once per frame. `close()` is safe twice."""

    name: str
    beats_per_bar: int

    def at(self, t: float) -> Position:
        """The position at monotonic time `t` (seconds), extrapolated at the current tempo."""
        ...

    def set_bpm(self, bpm: float, t: float | None = None) -> None:
        """Ask for a tempo (a clock that follows another device may ignore it)."""
        ...

    def downbeat(self, t: float | None = None) -> None:
        """Make `t` (default now) a bar line, where the clock owns its beat."""
        ...

    def close(self) -> None: ...


def check_bpm(bpm: float) -> float:
    if not (math.isfinite(bpm) and MIN_BPM <= bpm <= MAX_BPM):
        raise ValueError(f"bpm = {bpm!r} is not valid: must be a number in {MIN_BPM:g}..{MAX_BPM:g}")
    return float(bpm)


@dataclass(frozen=True, slots=True)
class _Anchor:
    t: float
    beat: float
    bpm: float


class InternalClock:
    """A free-running clock: `bpm` beats a minute from `origin` (default: when it is made).

    A tempo change keeps the beat continuous (the grid bends at the change, it does not jump);
    `downbeat(t)` makes `t` the start of a bar (a tap from the performer). The anchor is an
    immutable value replaced whole, so `at()` may be called from any thread.
    """

    name = "internal"

    def __init__(self, bpm: float = 120.0, beats_per_bar: int = 4, *, origin: float | None = None) -> None:
        if not 1 <= beats_per_bar <= 16:
            raise ValueError(f"beats_per_bar = {beats_per_bar}: must be in 1..16")
        self.beats_per_bar = beats_per_bar
        self._lock = threading.Lock()  # writers only; readers take the anchor as it is
        self._anchor = _Anchor(time.monotonic() if origin is None else origin, 0.0, check_bpm(bpm))

    def at(self, t: float) -> Position:
        a = self._anchor
        return Position(a.beat + (t - a.t) * a.bpm / 60.0, a.bpm, self.beats_per_bar)

    @property
    def bpm(self) -> float:
        return self._anchor.bpm

    def set_bpm(self, bpm: float, t: float | None = None) -> None:
        bpm = check_bpm(bpm)
        with self._lock:
            t = time.monotonic() if t is None else t
            self._anchor = _Anchor(t, self.at(t).beat, bpm)

    def downbeat(self, t: float | None = None) -> None:
        """Make `t` the first beat of the next bar (or of this one, if it is nearer)."""
        with self._lock:
            t = time.monotonic() if t is None else t
            beat = self.at(t).beat
            self._anchor = _Anchor(t, round(beat / self.beats_per_bar) * self.beats_per_bar, self._anchor.bpm)

    def close(self) -> None:
        pass
