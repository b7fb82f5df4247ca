"""External ControlNet maps: a reader thread per map source URI, the engine thread takes the newest.

A ControlNet whose `map` is a source URI (`shm://td-depth`, `ndi://KinectDepth`, `file://…`)
gets its map from another program. For each such net the node runs a `controlmap:<N>` thread
under the guard: it opens the source through the io registry (retrying with backoff), fits each
frame to the engine's size like the main source (`source.fit`), and leaves the newest in a
one-slot mailbox. Between frames the engine thread polls the mailboxes and hands the engine the
maps that arrived (`Engine.set_control_map`); when a source goes away nothing arrives and the
engine keeps the last map. Maps never wait for the engine and the engine never waits for a map.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from streamnode.io.base import Retry, SourceEnded, create_source
from streamnode.io.fit import Fitter
from streamnode.live_params import CONTROL_MAP_BUILTINS, ControlNetParams
from streamnode.node.sinks import close_quietly

logger = logging.getLogger(__name__)

TICK_S = 0.05

Spawn = Callable[[str, Callable[[threading.Event], None], threading.Event], threading.Thread]


@dataclass(eq=False)
class _Reader:
    uri: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    newest: np.ndarray | None = None
    maps_in: int = 0
    thread: threading.Thread | None = None


class ControlMaps:
    """The external map readers by ControlNet index. `sync` and `poll` run on the engine thread."""

    def __init__(self, width: int, height: int, fit: str, spawn: Spawn) -> None:
        self.width, self.height, self.fit = width, height, fit
        self._spawn = spawn
        self._readers: dict[int, _Reader] = {}

    def sync(self, nets: Mapping[int, ControlNetParams]) -> None:
        """Run a reader for every net whose map is a source URI, and only for those."""
        wanted = {i: p.map for i, p in nets.items() if p.map not in CONTROL_MAP_BUILTINS and p.enabled}
        for index, reader in list(self._readers.items()):
            if wanted.get(index) != reader.uri:
                self._stop(index)
        for index, uri in wanted.items():
            if index not in self._readers:
                reader = self._readers[index] = _Reader(uri)
                reader.thread = self._spawn(f"controlmap:{index}", lambda stop, r=reader: self._read(r, stop),
                                            reader.stop)

    def poll(self) -> list[tuple[int, np.ndarray]]:
        """The maps that arrived since the last poll, newest per net."""
        out = []
        for index, reader in self._readers.items():
            with reader.lock:
                image, reader.newest = reader.newest, None
            if image is not None:
                out.append((index, image))
        return out

    def status(self) -> dict[str, int]:
        return {str(i): r.maps_in for i, r in self._readers.items()}

    def _stop(self, index: int) -> None:
        reader = self._readers.pop(index)
        reader.stop.set()

    def close(self) -> None:
        for index in list(self._readers):
            self._stop(index)

    def _read(self, reader: _Reader, stop: threading.Event) -> None:
        """The reader thread: source → fitted map → mailbox (latest wins)."""
        source = create_source(reader.uri)
        fit = Fitter(self.width, self.height, self.fit)  # type: ignore[arg-type]
        retry = Retry(f"controlnet map {reader.uri}", log=logger)
        is_open = False
        try:
            while not stop.is_set():
                if not is_open:
                    if not retry.ready():
                        stop.wait(min(TICK_S, retry.wait_s()))
                        continue
                    try:
                        source.open()
                        is_open = True
                    except Exception as e:  # noqa: BLE001 - any open failure is retried
                        retry.failed(e)
                        close_quietly(source)
                        continue
                try:
                    image = source.read(TICK_S)
                except SourceEnded:
                    logger.info("controlnet map %s: end of source; the last map holds", reader.uri)
                    return
                except Exception as e:  # noqa: BLE001 - a read failure means reopen; the last map holds
                    retry.failed(e)
                    close_quietly(source)
                    is_open = False
                    continue
                if image is None:
                    continue
                if retry.failing:
                    retry.succeeded()
                fitted = np.empty((self.height, self.width, 3), np.uint8)  # handed over: a new array each
                fit(image, fitted)
                with reader.lock:
                    reader.newest = fitted
                    reader.maps_in += 1
        finally:
            if is_open:
                close_quietly(source)
