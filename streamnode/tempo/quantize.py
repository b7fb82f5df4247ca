"""Quantized changes: hold an update until the next beat, bar or N bars, then let it go early
by the lookahead, so the frame that carries it leaves the node on the beat.

The grid: `beat` every beat, `bar` every beats_per_bar beats, `2bars`/`4bars`/`8bars`. An
update that arrived at time t is due on the first grid line after the beat it would be when a
frame started at t leaves the node (`clock.at(t + lookahead)`): a change that could not make
the coming line even then waits for the next one instead of landing late. It is released at the first frame
boundary where `clock.at(now + lookahead).beat` has reached that line; the lookahead is the
engine's measured call time (the node keeps it up to date), so the released change rides the
frame that comes out at the line.

Latest wins per slot here too: a second value for the same parameter while one is held
replaces it (and keeps the later line of the two).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from streamnode.live_params import QUANTIZE_MODES

_EPS = 1e-9
T = TypeVar("T")


def grid_beats(mode: str, beats_per_bar: int) -> float | None:
    """The grid spacing in beats of `mode`; None for "off"."""
    if mode == "off":
        return None
    if mode == "beat":
        return 1.0
    if mode == "bar":
        return float(beats_per_bar)
    if mode.endswith("bars") and mode[:-4].isdigit() and mode in QUANTIZE_MODES:
        return float(int(mode[:-4]) * beats_per_bar)
    raise ValueError(f"quantize = {mode!r} is not valid: must be one of {', '.join(QUANTIZE_MODES)}")


def next_line(beat: float, grid: float) -> float:
    """The first grid line strictly after `beat` (a beat exactly on a line waits for the next)."""
    return (math.floor(beat / grid + _EPS) + 1) * grid


@dataclass(slots=True)
class Held(Generic[T]):
    item: T
    line: float
    """The beat it is due on."""


class Quantizer(Generic[T]):
    """Items held until their grid line, latest wins per key. Owned by one thread (the engine's)."""

    def __init__(self) -> None:
        self._held: dict[Hashable, Held[T]] = {}

    def hold(self, key: Hashable, item: T, grid: float, beat_ahead: float) -> float:
        """Hold `item` until the line after `beat_ahead` (the beat at now + lookahead); returns it."""
        line = next_line(beat_ahead, grid)
        old = self._held.pop(key, None)
        if old is not None:
            line = max(line, old.line)
        self._held[key] = Held(item, line)
        return line

    def due(self, beat_ahead: float) -> list[Held[T]]:
        """Release (in the order they were held) every item whose line `beat_ahead` has reached."""
        if not self._held:
            return []
        ready = [k for k, h in self._held.items() if beat_ahead + _EPS >= h.line]
        return [self._held.pop(k) for k in ready]

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> list[Held[T]]:
        held, self._held = list(self._held.values()), {}
        return held
