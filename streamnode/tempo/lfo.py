"""LFOs: a wave over beats (tempo-synced) or seconds (Hz) driving one numeric live parameter.

Evaluated by the engine thread once per frame, at the time that frame will leave the node
(now + the engine's measured latency), so a synced LFO peaks on the beat the audience sees.
Evaluating there rather than pushing updates through the control queue costs one small function
per LFO per frame, never more values than frames, and nothing at all while no LFO runs
(docs/tempo.md, benchmarks/tempo.py measures it).

value = offset + depth·wave, clamped to the target's range (rounded for an integer target).
"""

from __future__ import annotations

import math

from streamnode.live_params import LfoParams, NumericTarget, numeric_target

_DECAY = 5.0  # envelope: e^(−5·phase), down to 0.7 % at the end of a cycle


def cycles(lfo: LfoParams, beat: float, seconds: float) -> float:
    """How many cycles the LFO has run at (beat, seconds), its phase shift included."""
    return (beat / lfo.beats if lfo.sync else seconds * lfo.hz) + lfo.phase


def wave(shape: str, position: float, salt: int = 0) -> float:
    """The wave at `position` cycles: −1..1 (envelope 0..1); `salt` decorrelates random LFOs."""
    phase = position % 1.0
    if shape == "sine":
        return math.sin(2.0 * math.pi * phase)
    if shape == "triangle":
        return 1.0 - 4.0 * abs(phase - 0.5)
    if shape == "saw":
        return 2.0 * phase - 1.0
    if shape == "square":
        return 1.0 if phase < 0.5 else -1.0
    if shape == "random":
        return _hash_unit(math.floor(position), salt) * 2.0 - 1.0
    if shape == "envelope":
        return math.exp(-_DECAY * phase)
    raise ValueError(f"unknown LFO shape {shape!r}")


def _hash_unit(n: int, salt: int) -> float:
    """A fixed pseudo-random number in [0, 1) for cycle `n` (splitmix64): the same cycle always
    holds the same value, whatever the frame rate."""
    z = (n * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def value(lfo: LfoParams, target: NumericTarget, beat: float, seconds: float, salt: int = 0) -> float | int:
    """The target's value at (beat, seconds), in its range."""
    raw = lfo.offset + lfo.depth * wave(lfo.shape, cycles(lfo, beat, seconds), salt)
    clamped = min(target.high, max(target.low, raw))
    return int(round(clamped)) if target.integer else clamped


def target_of(lfo: LfoParams) -> NumericTarget | None:
    """The parameter the LFO drives; None when it has no target or is off."""
    return numeric_target(lfo.target) if lfo.target and lfo.enabled else None
