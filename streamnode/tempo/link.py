"""Ableton Link: share tempo and beat with Ableton Live, Resolume, TouchDesigner and any other
Link peer on the network.

The binding is `linkpython-extern` (the `tempo` extra), chosen over `aalink` after trying both
(docs/tempo.md): it wraps Link's session state as is, so the clock answers "which beat at time
t" for any t (`beatAtTime`) from any thread without an event loop; aalink exposes the beat now
and waits for beats through asyncio: this threaded node would run an event loop for it and
extrapolate the beat at now + the engine's latency itself.

Link's clock is not `time.monotonic()`; `at(t)` converts through the offset between the two,
read at each call (two cheap calls). Peers joining and leaving are logged (Link's own thread
calls back); with no peers the clock runs alone at the last tempo, so the node never notices a
peer leaving except in the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streamnode.tempo.clock import Position, check_bpm

logger = logging.getLogger(__name__)


class LinkUnavailable(RuntimeError):
    """The Link binding is not installed."""


class LinkClock:
    """A Link session member. `at()` from any thread; `close()` leaves the session (safe twice)."""

    name = "link"

    def __init__(self, bpm: float = 120.0, beats_per_bar: int = 4) -> None:
        try:
            import link as ableton_link
        except ImportError as e:
            raise LinkUnavailable(
                f"Ableton Link needs linkpython-extern ({e}): pip install 'streamnode[tempo]'"
            ) from None
        self.beats_per_bar = beats_per_bar
        self._link: Any = ableton_link.Link(check_bpm(bpm))
        self._link.setNumPeersCallback(self._on_peers)
        self._peers = 0
        self._link.enabled = True

    def _on_peers(self, count: int) -> None:
        # Link's thread: log only; the clock needs no action (the session state carries on).
        joined = count > self._peers
        self._peers = count
        logger.info("Link: a peer %s (%d peer%s)", "joined" if joined else "left", count, "" if count == 1 else "s")

    @property
    def peers(self) -> int:
        return int(self._link.numPeers())

    def at(self, t: float) -> Position:
        link = self._link
        micros = link.clock().micros() + (t - time.monotonic()) * 1e6
        state = link.captureAppSessionState()
        beat = state.beatAtTime(int(micros), float(self.beats_per_bar))
        return Position(float(beat), float(state.tempo()), self.beats_per_bar, True)

    @property
    def bpm(self) -> float:
        return float(self._link.captureAppSessionState().tempo())

    def set_bpm(self, bpm: float, t: float | None = None) -> None:
        """Propose a tempo to the session (every peer follows)."""
        link = self._link
        state = link.captureAppSessionState()
        state.setTempo(check_bpm(bpm), link.clock().micros())
        link.commitAppSessionState(state)

    def downbeat(self, t: float | None = None) -> None:
        """Link's beat is the session's: a local downbeat would fight the other peers; ignored."""

    def close(self) -> None:
        """Leave the session; the clock still answers `at()` (on its own) for a last status."""
        self._link.enabled = False
