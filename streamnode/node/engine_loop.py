"""The engine thread: the only owner of the engine. Loads it, applies updates between frames,
runs one engine call per frame (per frame_buffer_size frames) and hands the results on.

Each result is tagged with the (seq, t_capture) of the input it came from, `delay_calls`
calls back, so the latency the sinks measure includes the stream batch. With --no-drop the
first `delay_calls` results (the warm-up) are dropped and the pipeline is flushed at the end,
so the n-th output belongs to the n-th input and none is missing. Between frames the thread
also swaps in an engine loaded off-thread (model_switch.py), so a model switch never freezes
the picture.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from streamnode.engine import Engine
from streamnode.log_limit import LogLimiter, held_text
from streamnode.node.apply import Applier

if TYPE_CHECKING:
    from streamnode.node.lifecycle import Node

logger = logging.getLogger(__name__)

MAP_WAIT_NO_DROP_S = 10.0
"""--no-drop (a render): how long a frame waits for its ControlNet map before the newest one is used."""
TICK_S = 0.05
Tag = tuple[int, int]  # (seq, t_capture) of the input a result belongs to


class EngineLoop:
    def __init__(self, node: Node, applier: Applier) -> None:
        self.node = node
        self.applier = applier
        self._log_limit = LogLimiter()
        self.failures = 0  # engine calls failed in a row
        self.last_input: np.ndarray | None = None  # what the engine last got (valid until the next read)

    # -- the thread

    def run(self, stop: threading.Event) -> None:
        node = self.node
        try:
            node.set_state("loading_model")
            try:
                engine = node.engine_factory(node.config)
            except Exception as e:  # noqa: BLE001 - reported as a startup failure
                logger.debug("engine failed to load", exc_info=True)
                node.fail(f"engine: {e}")
                return
            node.install_engine(engine, node.config)
            try:
                self.applier.setup_brushes(engine)
            except Exception as e:  # noqa: BLE001 - a bad preset brush is a startup failure, reported
                node.fail(str(e))
                return
            del engine  # the node holds it: a model switch must be able to free it (node/heap.py)
            node.publish_live()
            node.control_maps.sync(node.live().controlnets)  # the preprocessors see the first frame
            node.engine_ready.set()
            # The first call fills the stream batch (T−1 silent steps) and compiles lazy kernels.
            node.set_state("warming_up")
            if node.txt2img:
                self._txt2img_loop(stop)
            else:
                self._img2img_loop(stop)
        finally:
            node.finish_output()

    def _between_frames(self) -> bool:
        """Apply updates and swap in a loaded engine; True if the engine was replaced."""
        self.applier.apply_pending()
        swapped = False
        for loaded in self.node.loader.take():
            update = loaded.job.update
            if loaded.engine is None:
                self.applier.failed(update, f"model {loaded.job.config.model.id!r}: {loaded.error}")
                continue
            try:
                self.applier.swap_in(loaded.engine, loaded.job)
            except Exception as e:  # noqa: BLE001 - the old engine keeps the show
                self.applier.failed(update, f"model {loaded.job.config.model.id!r}: {e}")
                continue
            self.node.queue.report(update)
            swapped = True
        return swapped

    def _img2img_loop(self, stop: threading.Event) -> None:
        node = self.node
        ring, outputs = node.ring, node.outputs
        get = ring.get_next if node.no_drop else ring.get_latest
        F = node.config.stream.frame_buffer_size
        batch = np.zeros((F, node.height, node.width, 3), np.uint8) if F > 1 else None
        pending: list[Tag] = []  # tags of the frames gathered into `batch`
        history: deque[list[Tag]] = deque(maxlen=self._engine().delay_calls + 1)
        discard = history.maxlen - 1 if node.no_drop else 0  # type: ignore[operator]
        last: tuple[np.ndarray, list[Tag]] | None = None
        while not stop.is_set() and not outputs.complete.is_set():
            if self._between_frames() or history.maxlen != self._engine().delay_calls + 1:
                history = deque(history, maxlen=self._engine().delay_calls + 1)
            frame = get(TICK_S)
            # Right before the call (a frame is here): held changes due on the beat, LFOs. Also
            # while paused, bypassed or waiting for a frame: a held change is never stuck.
            node.tempo.before_call(self.applier)
            if frame is None:
                if ring.ended:
                    break
                continue
            if node.switches.pause:
                continue  # the sinks keep the last output
            if node.switches.bypass:
                node.show(frame.image, [(frame.seq, frame.t_capture)])
                continue
            if batch is None:
                image, tags = frame.image, [(frame.seq, frame.t_capture)]
            else:
                np.copyto(batch[len(pending)], frame.image)
                pending.append((frame.seq, frame.t_capture))
                if len(pending) < F:
                    continue
                image, tags, pending = batch, pending, []
            self.last_input = image
            self._hand_maps(tags)
            out = self._call(image)
            if out is None:
                continue
            history.append(tags)
            last = (image, tags)
            if discard:
                discard -= 1
                continue
            node.show(out, history[0])
        if node.no_drop and last is not None and not stop.is_set() and not outputs.complete.is_set():
            # Flush: the last inputs' results are still inside the stream batch.
            image, tags = last
            for _ in range(self._engine().delay_calls):
                out = self._call(image)
                if out is not None:
                    history.append(tags)
                    if not node.show(out, history[0]):
                        return

    def _txt2img_loop(self, stop: threading.Event) -> None:
        node = self.node
        interval = 1.0 / node.fps
        next_due = time.monotonic()
        seq = 0
        while not stop.wait(max(0.0, next_due - time.monotonic())) and not node.outputs.complete.is_set():
            next_due = max(next_due + interval, time.monotonic() - interval)
            self._between_frames()
            node.tempo.before_call(self.applier)
            if node.switches.pause:
                continue
            t_capture = time.monotonic_ns()
            out = self._call(None)
            if out is not None:
                rows = out.shape[0] if out.ndim == 4 else 1
                node.show(out, [(seq + i + 1, t_capture) for i in range(rows)])
                seq += rows

    def _hand_maps(self, tags: list[Tag]) -> None:
        """The preprocessed ControlNet maps of these frames to the engine (node/control_maps.py):
        live, waiting at most a frame interval for a preprocessor behind; --no-drop, every frame
        its own map."""
        node = self.node
        timeout = MAP_WAIT_NO_DROP_S if node.no_drop else 1.0 / node.fps
        for index, image in node.control_maps.maps_for([seq for seq, _ in tags], timeout):
            try:
                self._engine().set_control_map(index, image, derived=True)
            except Exception as e:  # noqa: BLE001 - a bad map is reported, never fatal
                node.set_error(f"controlnet {index} map: {e}")

    def _engine(self) -> Engine:
        engine = self.node.engine
        assert engine is not None
        return engine

    def _call(self, image: np.ndarray | None) -> np.ndarray | None:
        node = self.node
        engine = self._engine()
        t0 = time.perf_counter()
        try:
            out = engine.txt2img() if image is None else engine(image)
        except Exception as e:  # noqa: BLE001 - one bad frame must not end the show
            self.failures += 1
            node.set_error(f"engine: {e}")
            if self.failures >= 3:
                node.set_state("error")
            if (held := self._log_limit("engine-call")) is not None:
                logger.error("engine call failed: %s%s", e, held_text(held))
            return None
        node.engine_call_done((time.perf_counter() - t0) * 1e3)
        self.failures = 0
        return out

    def recent_input(self) -> np.ndarray | None:
        """A copy of the input the engine last got (to warm a new engine), None before the first."""
        return None if self.last_input is None else self.last_input.copy()
