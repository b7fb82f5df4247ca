"""Loading another engine off the engine thread while the current one keeps serving frames.

A `/model` (or a preset naming another model) asks for a new engine; a `model-loader` thread
builds it with the node's engine factory, prepares it with the live state in force when the
request was made (parameters, brushes, their order and masks), and warms it with one call on a
recent input frame (the stream fill, lazy kernels, compiled graphs), so its first call on the
engine thread costs no more than any other. The engine thread then takes the result at a frame
boundary (`take()`), brings it up to date with whatever changed during the load, and swaps
(node/engine_loop.py). The engine that lost is handed back (`retire()`) and closed here too:
closing an OpenVINO engine took 27-33 ms (its UNet's compiled model), which on the engine
thread lengthened the frame of the swap by as much. The loader shares the interpreter with the
engine thread (node/interpreter_share.py), so a load slows the load, not the picture. One load
at a time: a newer request supersedes a pending one, and an engine nobody will use is closed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from streamnode.accel.cache import misses_filled_by
from streamnode.config import NodeConfig
from streamnode.control.updates import Update
from streamnode.engine import Engine
from streamnode.live_params import LiveState
from streamnode.node.build import EngineFactory
from streamnode.node.interpreter_share import sharing_the_interpreter
from streamnode.node.prebuild import Prebuild

logger = logging.getLogger(__name__)


@dataclass
class LoadJob:
    config: NodeConfig  # the config with the new model
    update: Update  # the request, reported applied or failed when the load ends
    state: LiveState  # the live state to prepare the new engine with
    frame: np.ndarray | None  # a recent input to warm it with
    txt2img: bool = False  # warm it with a txt2img call instead (no input; none yet: no warm call)


@dataclass
class Loaded:
    job: LoadJob
    engine: Engine | None
    error: str = ""


def replay(engine: Engine, state: LiveState) -> None:
    """Put `state` onto a fresh engine: its parameters at once, then every brush in cover order,
    then every LoRA and ControlNet (read again for this engine's UNet, here on the loader thread).
    One that does not fit the new model (made for another base) is left out with one log line: the
    switch goes on without it."""
    engine.prepare(state.params)
    for index in state.brush_order:
        engine.update(brush=(index, state.brushes[index].edit()))
    for index, lora in state.loras.items():
        try:
            engine.update(lora=(index, lora.model_dump()))
        except ValueError as e:
            logger.warning("model switch: LoRA %d (%s) left out: %s", index, lora.source, e)
    for index, net in state.controlnets.items():
        try:
            engine.update(controlnet=(index, net.model_dump()))
        except ValueError as e:
            logger.warning("model switch: ControlNet %d (%s) left out: %s", index, net.model, e)


class ModelLoader:
    """Builds engines on its own thread; the engine thread polls `take()` between frames."""

    def __init__(self, factory: EngineFactory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._next: LoadJob | None = None
        self._done: list[Loaded] = []
        self._retired: list[Engine] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.loading: str | None = None  # the model id being loaded, for status()

    def request(self, job: LoadJob) -> None:
        """Start loading (or queue, replacing a queued request). Engine thread."""
        with self._lock:
            if self._closed:
                return
            if self._next is not None:
                self._done.append(Loaded(self._next, None, f"superseded by {job.config.model.id!r}"))
            self._next = job
            self._wake()

    def retire(self, engine: Engine) -> None:
        """Close an engine that lost its place, off the engine thread (soon, in order). Never raises:
        called in a `finally`; once the loader is closed, the engine is closed here and now."""
        with self._lock:
            if not self._closed:
                self._retired.append(engine)
                self._wake()
                return
        _close(engine)

    def _wake(self) -> None:
        """Start the worker if none runs (the lock is held; a worker that found nothing to do and
        ends clears `_thread` under the same lock, so no request falls between)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="model-loader", daemon=True)
            self._thread.start()

    def take(self) -> list[Loaded]:
        """Finished loads (engines to swap in, or failures to report), oldest first. Engine thread."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def _work(self) -> None:
        while True:
            with self._lock:
                retired, self._retired = self._retired, []
                job = None
                if not retired:
                    job, self._next = self._next, None
                    if job is None or self._closed:
                        self.loading = None
                        self._thread = None
                        return
                    self.loading = job.config.model.id
            if retired:
                with sharing_the_interpreter():
                    _close_each(retired)  # empties the list: nothing here keeps a closed model alive
                continue
            try:
                result = self._load(job)
            except Exception as e:  # noqa: BLE001 - a bug here must still end in a report, not a silent thread
                logger.exception("model-loader failed")
                result = Loaded(job, None, f"the loader failed: {e}")
            with self._lock:
                superseded = self._next is not None
                if self._closed or (superseded and result.engine is not None):
                    if result.engine is not None:
                        result.engine.close()
                    result = Loaded(job, None, "superseded" if superseded else "the node is stopping")
                self._done.append(result)

    def _abandoned(self) -> bool:
        """The load in progress is no longer wanted: the node stops, or a newer request waits."""
        return self._closed or self._next is not None

    def _load(self, job: LoadJob) -> Loaded:
        with sharing_the_interpreter():
            return self._build(job)

    def _build(self, job: LoadJob) -> Loaded:
        model = job.config.model.id
        logger.info("loading model %s (the current one keeps streaming)", model)
        try:
            # What the engine cache lacks is built in another process, not on this thread.
            with misses_filled_by(Prebuild(job.config, abandoned=self._abandoned)):
                engine = self._factory(job.config)
        except Exception as e:  # noqa: BLE001 - a model that will not load is reported, never fatal
            logger.debug("model %s failed to load", model, exc_info=True)
            return Loaded(job, None, str(e) or type(e).__name__)
        try:
            replay(engine, job.state)
            if job.txt2img:
                engine.txt2img()
            elif job.frame is not None:
                engine(job.frame)
        except Exception as e:  # noqa: BLE001 - the new engine cannot take the show: keep the old one
            logger.debug("model %s failed to warm up", model, exc_info=True)
            engine.close()
            return Loaded(job, None, f"cannot take over the live state: {e}")
        return Loaded(job, engine)

    def close(self, timeout: float) -> None:
        """No more loads; an engine built meanwhile is closed. Waits up to `timeout` s."""
        with self._lock:
            self._closed = True
            self._next = None
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            retired, self._retired = self._retired, []
        _close_each(retired)
        for result in self.take():
            if result.engine is not None:
                result.engine.close()


def _close(engine: Engine) -> None:
    """Close an engine that is no one's any more; a failure costs a log line, nothing else."""
    try:
        engine.close()
    except Exception:  # noqa: BLE001 - the show goes on with the engine that replaced it
        logger.exception("closing the replaced engine failed")


def _close_each(engines: list[Engine]) -> None:
    """Close and drop every engine in `engines`, oldest first."""
    engines.reverse()
    while engines:
        _close(engines.pop())
