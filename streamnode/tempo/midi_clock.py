"""MIDI clock in: 24 pulses per quarter note from a sequencer or DAW → tempo and beat.

`MidiClock.feed(kind, t, value)` takes the realtime messages ("clock", "start", "continue",
"stop", "songpos" with its position in sixteenths) stamped with their arrival time; the tempo is
the mean pulse interval over the last beat (24 pulses), so one late pulse moves it little. Between
pulses `at(t)` extrapolates at that tempo, never further than one pulse ahead, so a clock that
stops sending does not run away. Stopped, the beat stays where it is.

The port itself is opened by midi_ports.py (lazily: mido + python-rtmidi, the `tempo` extra);
a device unplugged is logged once and re-opened with backoff while the node plays on at the last
tempo (docs/tempo.md).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from streamnode.tempo.clock import MAX_BPM, MIN_BPM, Position

PPQN = 24
"""MIDI clock pulses per quarter note (beat)."""


@dataclass(frozen=True, slots=True)
class _Anchor:
    t: float  # arrival of the last pulse (or start/stop)
    pulses: int  # pulses since the origin at t
    bpm: float
    playing: bool


class MidiClock:
    """A clock following MIDI clock messages. `feed` from one thread, `at` from any."""

    name = "midi"

    def __init__(self, bpm: float = 120.0, beats_per_bar: int = 4) -> None:
        self.beats_per_bar = beats_per_bar
        self._anchor = _Anchor(time.monotonic(), 0, bpm, False)
        self._intervals: deque[float] = deque(maxlen=PPQN)
        self._last_pulse = -1e9

    def feed(self, kind: str, t: float, value: int = 0) -> None:
        a = self._anchor
        if kind == "clock":
            # A sequencer may send pulses while stopped too (the tempo, for the followers): the
            # tempo follows them always, the beat only while playing.
            dt = t - self._last_pulse
            self._last_pulse = t
            if 0.0 < dt < 60.0 / (MIN_BPM * PPQN):  # a gap longer than the slowest pulse restarts the mean
                self._intervals.append(dt)
            else:
                self._intervals.clear()
            bpm = a.bpm
            if len(self._intervals) >= 2:
                bpm = min(MAX_BPM, max(MIN_BPM, 60.0 / (PPQN * (sum(self._intervals) / len(self._intervals)))))
            if a.playing:
                self._anchor = _Anchor(t, a.pulses + 1, bpm, True)
            else:
                self._anchor = _Anchor(a.t, a.pulses, bpm, False)
        elif kind == "start":
            # The first pulse after Start (or Continue) is the position's own pulse: one before it until then.
            self._anchor = _Anchor(t, -1, a.bpm, True)
        elif kind == "continue":
            self._anchor = _Anchor(t, a.pulses - 1, a.bpm, True)
        elif kind == "stop":
            self._anchor = _Anchor(t, a.pulses, a.bpm, False)
        elif kind == "songpos":
            # Song position pointer: sixteenth notes (6 pulses each) from the song's start.
            self._anchor = _Anchor(t, int(value) * 6, a.bpm, a.playing)

    def at(self, t: float) -> Position:
        a = self._anchor
        beat = a.pulses / PPQN
        if a.playing:
            ahead = max(0.0, t - a.t) * a.bpm / 60.0
            beat += min(ahead, 1.0 / PPQN)  # no further than the next pulse
        return Position(beat, a.bpm, self.beats_per_bar, a.playing)

    @property
    def bpm(self) -> float:
        return self._anchor.bpm

    def set_bpm(self, bpm: float, t: float | None = None) -> None:
        """The sender sets the tempo: ignored."""

    def downbeat(self, t: float | None = None) -> None:
        """The sender's song position sets the bar: ignored."""

    def close(self) -> None:
        pass


def feed_messages(clock: MidiClock, messages: list[object], t: float) -> None:
    """Mido messages read together at `t` → the clock, in order (others are ignored)."""
    for message in messages:
        kind = getattr(message, "type", "")
        if kind in ("clock", "start", "continue", "stop"):
            clock.feed(kind, t)
        elif kind == "songpos":
            clock.feed(kind, t, int(getattr(message, "pos", 0)))
