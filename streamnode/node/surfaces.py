"""The node's other control surfaces: MIDI in (a mapping, learn mode, MIDI clock) and Art-Net in.

Each runs on its own thread (`midi:<port>`, `midi-clock:<port>`, `artnet-recv`) and only puts
updates on the ControlQueue (or feeds the MIDI clock), like the OSC receiver: latest wins per
parameter, applied between frames. Opened at start: a mapping file that cannot be read, a
MIDI extra that is missing or an Art-Net port in use fail the start with the fix; a MIDI
device that is missing or unplugged later is retried with backoff while the node plays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamnode.config import NodeConfig
from streamnode.control.artnet import ArtNetMapper, ArtNetReceiver
from streamnode.control.midi import MidiMapper, default_mapping_path
from streamnode.control.updates import ControlQueue
from streamnode.live_params import GROUPS, LiveState
from streamnode.tempo.clock import Clock

Worker = Callable[[threading.Event], None]


class Surfaces:
    def __init__(self, config: NodeConfig, queue: ControlQueue, *, live: Callable[[], LiveState], clock: Clock) -> None:
        self.config = config
        self.queue = queue
        self.live = live
        self.clock = clock
        self.limits = {g.name: int(getattr(config.runtime, g.limit)) for g in GROUPS}
        self.stop_event = threading.Event()
        self.midi: MidiMapper | None = None
        self.artnet: ArtNetReceiver | None = None
        self._workers: list[tuple[str, Worker]] = []

    def open(self) -> None:
        c = self.config
        if c.midi.port or c.tempo.source == "midi":
            from streamnode.tempo.midi_ports import input_names

            input_names()  # mido missing: fails the start with the fix (a missing device is retried)
        if c.midi.port:
            path = Path(c.midi.mapping).expanduser() if c.midi.mapping else default_mapping_path()
            self.midi = MidiMapper(self.queue, self.limits, path, live=self.live)
            self._workers.append((f"midi:{c.midi.port}", self._reader(c.midi.port, self.midi.handle_pending, control=True)))
        if c.tempo.source == "midi" and c.tempo.midi_clock_port:
            from streamnode.tempo.midi_clock import MidiClock, feed_messages

            clock = self.clock
            if isinstance(clock, MidiClock):
                self._workers.append((f"midi-clock:{c.tempo.midi_clock_port}", self._reader(
                    c.tempo.midi_clock_port, lambda ms: feed_messages(clock, ms, time.monotonic()))))
        if c.artnet.enabled:
            mapper = ArtNetMapper.from_config(self.queue, c.artnet, self.limits)
            self.artnet = ArtNetReceiver(mapper, c.artnet.host, c.artnet.port)
            self.artnet.open()
            self._workers.append(("artnet-recv", self.artnet.run))

    @staticmethod
    def _reader(port: str, on_messages: Callable[[list[Any]], None], *, control: bool = False) -> Worker:
        def work(stop: threading.Event) -> None:
            from streamnode.tempo.midi_ports import CONTROL_POLL_S, POLL_S, read_port

            read_port(port, stop, on_messages, CONTROL_POLL_S if control else POLL_S)

        return work

    def workers(self) -> list[tuple[str, Worker]]:
        return list(self._workers)

    def close(self, timeout: float = 0.5) -> None:
        self.stop_event.set()
        for thread in threading.enumerate():
            if thread.name in {name for name, _ in self._workers}:
                thread.join(timeout)
        if self.artnet is not None:
            self.artnet.close()
