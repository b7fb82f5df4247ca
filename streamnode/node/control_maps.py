"""ControlNet maps made off the engine thread: a preprocessor or a reader thread per net.

A ControlNet whose `map` is a built-in preprocessor (canny, luma, edges-soft, passthrough) gets
a `controlmap:<N>` thread that computes the map of every frame the capture thread puts into the
ring (`offer`, a one-slot inbox: latest wins), keyed by the frame's sequence number. When the
engine thread takes a frame it takes that frame's map (`maps_for`), waiting for it at most one
frame interval: a preprocessor that keeps up adds no latency (it runs while the frame waits in
the ring and while the engine works on the previous one); one that falls behind gives the
newest map it has, so the stream never stalls.

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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamnode.io.base import Retry, SourceEnded, create_source
from streamnode.io.fit import Fitter
from streamnode.live_params import ControlNetParams, is_frame_map
from streamnode.node.sinks import close_quietly

logger = logging.getLogger(__name__)

TICK_S = 0.05

Spawn = Callable[[str, Callable[[threading.Event], None], threading.Event], threading.Thread]


@dataclass(eq=False)
class _Preprocessor:
    params: ControlNetParams
    stop: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)
    inbox_seq: int | None = None
    """The sequence number of the frame waiting in `inbox` (None: none waits)."""
    inbox: np.ndarray | None = None
    work: np.ndarray | None = None
    """Two preallocated frames: capture copies into `inbox`, the worker swaps it with `work`."""
    done: dict[int, np.ndarray] = field(default_factory=dict)
    """seq → map (H, W, 3) uint8, the last few frames."""
    newest: int = -1
    first: int | None = None
    """The first frame offered: earlier ones (in the ring before this worker began) never get a map."""
    maps_in: int = 0
    thread: threading.Thread | None = None
    error: str = ""
    """Why no map can be made (a depth model that would not load): logged once, retried on a change."""


def _map_fields(params: ControlNetParams) -> tuple[str, int, int]:
    """What a preprocessor's map depends on."""
    return params.map, params.canny_low, params.canny_high


_KEEP = 8
"""Maps kept per preprocessor: the engine takes frames at most a few behind the newest."""


@dataclass(eq=False)
class _Reader:
    uri: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    newest: np.ndarray | None = None
    last: np.ndarray | None = None
    """The last map handed to the engine (engine thread): a new engine after a model switch gets it too."""
    maps_in: int = 0
    thread: threading.Thread | None = None


class ControlMaps:
    """The external map readers by ControlNet index. `sync` and `poll` run on the engine thread."""

    def __init__(self, width: int, height: int, fit: str, spawn: Spawn) -> None:
        self.width, self.height, self.fit = width, height, fit
        self._spawn = spawn
        self._readers: dict[int, _Reader] = {}
        self._preprocessors: dict[int, _Preprocessor] = {}
        self._refused: dict[int, str] = {}
        self._errors: dict[int, str] = {}

    def sync(self, nets: Mapping[int, ControlNetParams]) -> None:
        """Run a reader for every net whose map is a source URI, a preprocessor for every net
        whose map is built in, and nothing for the others."""
        live = {i: p for i, p in nets.items() if p.enabled and p.model and p.scale > 0.0}
        builtin = {i: p for i, p in live.items() if is_frame_map(p.map)}
        # Copy on write: the capture thread reads the mapping while this one replaces it.
        workers = dict(self._preprocessors)
        for index, worker in list(workers.items()):
            if index not in builtin:
                workers.pop(index).stop.set()
            elif _map_fields(worker.params) != _map_fields(builtin[index]):
                with worker.cond:
                    worker.params, worker.done, worker.newest, worker.error = builtin[index], {}, -1, ""
        for index, params in builtin.items():
            if index not in workers:
                worker = workers[index] = _Preprocessor(params)
                worker.thread = self._spawn(f"controlmap:{index}", lambda stop, w=worker: self._preprocess(w, stop),
                                            worker.stop)
        self._preprocessors = workers
        wanted = {i: p.map for i, p in live.items() if not is_frame_map(p.map)}
        for index, reader in list(self._readers.items()):
            if wanted.get(index) != reader.uri:
                self._stop(index)
        for index, uri in wanted.items():
            if index in self._readers or self._refused.get(index) == uri:
                continue
            try:
                source = create_source(uri)  # an unknown scheme or a bad URI: refused here, once
            except Exception as e:  # noqa: BLE001 - a bad map source is reported, never fatal
                self._refused[index] = uri
                self._errors[index] = f"{uri}: {e}"
                logger.warning("controlnet %d map %s: %s", index, uri, e)
                continue
            self._refused.pop(index, None)
            self._errors.pop(index, None)
            reader = self._readers[index] = _Reader(uri)
            reader.thread = self._spawn(f"controlmap:{index}", lambda stop, r=reader, s=source: self._read(r, s, stop),
                                        reader.stop)
        for index in list(self._errors):
            if index not in wanted and index not in builtin:
                self._errors.pop(index)
                self._refused.pop(index, None)

    def offer(self, seq: int, image: np.ndarray) -> None:
        """A frame entering the ring (capture thread): every preprocessor gets a copy (latest wins)."""
        for worker in list(self._preprocessors.values()):
            with worker.cond:
                if worker.inbox is None or worker.inbox.shape != image.shape:
                    worker.inbox, worker.work = np.empty_like(image), np.empty_like(image)
                np.copyto(worker.inbox, image)
                worker.inbox_seq = seq
                worker.first = seq if worker.first is None else worker.first
                worker.cond.notify_all()

    def maps_for(self, seqs: list[int], timeout: float) -> list[tuple[int, np.ndarray]]:
        """Each preprocessor's maps of these frames (engine thread), stacked when several; waits
        up to `timeout` s in all, then takes the newest map for a frame still missing."""
        out = []
        deadline = time.monotonic() + timeout
        for index, worker in list(self._preprocessors.items()):
            maps = []
            with worker.cond:
                for seq in seqs:
                    offered = worker.first is not None and seq >= worker.first
                    while offered and seq not in worker.done and worker.newest < seq and not worker.stop.is_set():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        worker.cond.wait(left)
                    image = worker.done.get(seq, worker.done.get(worker.newest))
                    if image is None:
                        break
                    maps.append(image)
            if len(maps) == len(seqs):
                out.append((index, maps[0] if len(maps) == 1 else np.stack(maps)))
        return out

    def _preprocess(self, worker: _Preprocessor, stop: threading.Event) -> None:
        """The preprocessor thread: each frame offered → its map, kept by sequence number."""
        import torch

        from streamnode.diffusion.control_maps import make_map

        while not stop.is_set():
            with worker.cond:
                while worker.inbox_seq is None and not stop.is_set():
                    worker.cond.wait(TICK_S)
                if stop.is_set():
                    return
                seq, worker.inbox_seq = worker.inbox_seq, None
                worker.inbox, worker.work = worker.work, worker.inbox
                image, params = worker.work, worker.params
            if worker.error:
                continue  # refused until the map fields change (sync clears the error)
            try:
                with torch.inference_mode():
                    frame = torch.from_numpy(image).permute(2, 0, 1)[None].float().mul_(2.0 / 255.0).sub_(1.0)
                    grey = make_map(params.map, frame, canny_low=params.canny_low, canny_high=params.canny_high)
                    result = grey[0].permute(1, 2, 0).mul(255.0).round_().to(torch.uint8).numpy()
            except Exception as e:  # noqa: BLE001 - a depth model that cannot load: one line, no retry per frame
                worker.error = str(e) or type(e).__name__
                logger.warning("controlnet map %s: %s", params.map, worker.error)
                continue
            with worker.cond:
                if _map_fields(worker.params) == _map_fields(params):
                    worker.done[seq] = result
                    worker.newest = max(worker.newest, seq)
                    worker.maps_in += 1
                    for old in [k for k in worker.done if k <= worker.newest - _KEEP]:
                        del worker.done[old]
                    worker.cond.notify_all()

    def poll(self) -> list[tuple[int, np.ndarray]]:
        """The maps that arrived since the last poll, newest per net."""
        out = []
        for index, reader in self._readers.items():
            with reader.lock:
                image, reader.newest = reader.newest, None
            if image is not None:
                reader.last = image
                out.append((index, image))
        return out

    def held(self) -> list[tuple[int, np.ndarray]]:
        """The last external map of every net (engine thread): what a new engine must start from,
        since a still source sends no more."""
        return [(i, r.last) for i, r in self._readers.items() if r.last is not None]

    def status(self) -> dict[str, int]:
        """Maps made or read so far, by ControlNet index."""
        counts = {str(i): r.maps_in for i, r in self._readers.items()}
        counts.update({str(i): w.maps_in for i, w in self._preprocessors.items()})
        return counts

    def errors(self) -> dict[str, str]:
        """Why a net gets no map (a depth model that would not load), by ControlNet index."""
        errors = {str(i): e for i, e in self._errors.items()}
        errors.update({str(i): w.error for i, w in self._preprocessors.items() if w.error})
        return errors

    def _stop(self, index: int) -> None:
        reader = self._readers.pop(index, None)  # the engine thread and stop() may both close
        if reader is not None:
            reader.stop.set()

    def close(self, timeout: float = 0.5) -> None:
        """Stop every reader and preprocessor and wait up to `timeout` s for their threads. Safe twice."""
        threads = [r.thread for r in list(self._readers.values())]
        for index in list(self._readers):
            self._stop(index)
        workers, self._preprocessors = self._preprocessors, {}
        for worker in workers.values():
            worker.stop.set()
            threads.append(worker.thread)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _read(self, reader: _Reader, source: Any, stop: threading.Event) -> None:
        """The reader thread: source → fitted map → mailbox (latest wins)."""
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
