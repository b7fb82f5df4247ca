"""The node: opens the transports, starts the threads, watches the run, shuts down in order.

It owns the wiring and the state the threads share; each job lives in its own file:
capture.py (source → ring), engine_loop.py (ring → engine → outputs), apply.py (control updates),
model_switch.py (loading engines off the engine thread), presenter.py and sinks.py (outputs),
metrics.py, guard.py (every thread runs under it). docs/architecture.md draws the whole.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamnode.config import NodeConfig
from streamnode.control.updates import ControlQueue
from streamnode.engine import Engine
from streamnode.frames import RingBuffer
from streamnode.io.base import Sink, Source, TransportError, TransportOptions, create_sink, create_source
from streamnode.io.shm_masks import MaskChannels
from streamnode.live_params import BrushState, LiveState, NodeParams
from streamnode.node import heap
from streamnode.node.apply import Applier
from streamnode.node.build import EngineFactory, build_engine
from streamnode.node.capture import Capture
from streamnode.node.control_maps import ControlMaps
from streamnode.node.engine_loop import EngineLoop
from streamnode.node.guard import spawn_guarded
from streamnode.node.lora_loader import LoraLoader
from streamnode.node.metrics import LatencyWindow, RateMeter
from streamnode.node.model_switch import ModelLoader
from streamnode.node.presenter import GroupPresenter
from streamnode.node.sinks import Outputs, SinkWorker, close_quietly, make_slot
from streamnode.node.tempo import Tempo, make_clock
from streamnode.tempo.clock import Clock

logger = logging.getLogger(__name__)

TICK_S = 0.05  # how often idle workers look at their stop Event
SHUTDOWN_TIMEOUT_S = 2.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class StartupError(RuntimeError):
    """The node cannot start: a bad URI, a sink that cannot open, an engine that cannot load."""


class Node:
    """One running node. `run()` blocks until done; or `start()`, then `stop()` from anywhere.

    `engine_factory(config)` builds an engine (default: `build_engine`, with TensorRT build
    progress shown on the console); the engine thread calls it at start, the model loader on
    a model switch. `clock` replaces the one `config.tempo` asks for (tests, benchmarks: a
    clock whose beats fall at known times; docs/tempo.md). `status()` and `live()` are safe to call from any thread.

    Who writes what: the engine thread writes the engine, the switches (pause, bypass, preset),
    the published `LiveState`, the state and the error; the capture thread its counters; each
    sink thread its slot's counters; the one output writer `frames_out`.
    """

    def __init__(self, config: NodeConfig, *, engine_factory: EngineFactory | None = None,
                 clock: Clock | None = None, freeze_heap: bool = False) -> None:
        self.config = config
        self.freeze_heap = freeze_heap  # freeze the start-up heap at the first frame, collect after a switch (node/heap.py)
        self.engine_factory: EngineFactory = engine_factory or self._build_engine
        self._progress: Callable[[Any], None] | None = None
        self.queue = ControlQueue()
        s = config.stream
        self.width, self.height = s.width, s.height
        self.txt2img = s.mode == "txt2img"
        self.no_drop = config.runtime.no_drop
        self.fps = config.source.fps
        self._state = "starting"
        self._error = ""
        self._fatal: str | None = None
        self.engine: Engine | None = None
        self._last_stats: dict[str, int] = {}  # the engine's counters after it was closed
        t = config.tempo
        self.switches = NodeParams(bpm=t.bpm, quantize=t.quantize, cue_every=t.cue_every)
        self._own_clock = clock is None  # made from config.tempo at start (Link joins the network then)
        self.tempo = Tempo(self, clock)
        self._surfaces: Any = None
        self._live = LiveState()
        self.mask_channels = MaskChannels()
        self.loader = ModelLoader(lambda cfg: self.engine_factory(cfg))
        self.lora_loader = LoraLoader()
        self.controlnet_loader = LoraLoader("controlnet")
        self.control_maps = ControlMaps(
            s.width, s.height, config.source.fit,
            lambda name, work, stop: self._spawn(name, work, stop, restart=True),
        )
        self.engine_ready = threading.Event()
        self.ring = RingBuffer((s.height, s.width, 3), config.runtime.ring_slots, block=self.no_drop)
        self._aborted = threading.Event()  # set by stop(): writers that wait (--no-drop) give up
        self.outputs = Outputs([], no_drop=self.no_drop, max_frames=config.runtime.max_frames,
                               latency=LatencyWindow(), aborted=self._aborted)
        self.presenter = (
            GroupPresenter(s.frame_buffer_size, s.height, s.width, self.outputs.publish)
            if s.frame_buffer_size > 1 and not self.no_drop else None
        )
        self._source: Source | None = None
        self._capture: Capture | None = None
        self._applier = Applier(self)
        self._engine_loop = EngineLoop(self, self._applier)
        self._capture_stop = threading.Event()
        self._engine_stop = threading.Event()
        self._present_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._osc: Any = None
        self._started = False
        self._stopped = False
        self._dropped_before = 0
        self._engine_ms = 0.0
        self._rate_in = RateMeter()
        self._rate_out = RateMeter()
        self._t_start = 0.0
        self._t_streaming = 0.0  # when the first result came out

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the source and open the sinks (raising `StartupError`), then start the threads."""
        if self._started:
            return
        self._started = True
        self._t_start = time.monotonic()
        try:
            self._open_transports()
            self._start_tempo()
            self._start_osc()
        except BaseException:
            self._close_transports()
            self.tempo.close()
            raise
        self._spawn("engine", self._engine_loop.run, self._engine_stop, restart=False)
        if self.presenter is not None:
            self._spawn("present", self.presenter.run, self._present_stop, restart=True)
        if self._capture is not None:
            self._spawn("capture", self._capture.run, self._capture_stop, restart=True)
        for slot in self.outputs.slots:
            worker = SinkWorker(slot, no_drop=self.no_drop, latency=self.outputs.latency)
            slot.thread = self._spawn(slot.thread_name, worker.run, slot.stop, restart=True)

    def _open_transports(self) -> None:
        c = self.config
        options = TransportOptions(width=self.width, height=self.height, fps=self.fps, loop=c.source.loop,
                                   realtime=not self.no_drop, ndi_discovery=tuple(c.source.ndi_discovery),
                                   status=self.status)
        try:
            if not self.txt2img:
                self._source = create_source(c.source.uri, options)
                # A video file knows its own rate; the sinks and the hold clock follow it.
                self.fps = self._source.fps or self.fps
                options = dataclasses.replace(options, fps=self.fps)
                self._capture = Capture(self._source, self.ring, c.source, width=self.width, height=self.height,
                                        fps=self.fps, no_drop=self.no_drop, engine_ready=self.engine_ready,
                                        on_frame=self.control_maps.offer)
            for uri in c.sinks:
                sink = create_sink(uri, options)
                sink.open()
                self.outputs.slots.append(make_slot(sink, self.height, self.width, no_drop=self.no_drop, log=logger))
        except TransportError as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"{e}") from None

    def _start_tempo(self) -> None:
        """The clock the config asks for, and the MIDI and Art-Net surfaces (control/surfaces.py)."""
        if self._own_clock and self.config.tempo.source != "internal":
            try:
                self.tempo.clock = make_clock(self.config)
            except RuntimeError as e:
                raise StartupError(str(e)) from None
        from streamnode.node.surfaces import Surfaces

        self._surfaces = Surfaces(self.config, self.queue, live=self.live, clock=self.tempo.clock)
        try:
            self._surfaces.open()
        except (OSError, ValueError, RuntimeError) as e:
            raise StartupError(str(e)) from None
        for name, work in self._surfaces.workers():
            self._spawn(name, work, self._surfaces.stop_event, restart=True)

    def _start_osc(self) -> None:
        if not self.config.osc.enabled:
            return
        try:
            from streamnode.control.osc import OscServer, OscStartError
        except ImportError as e:
            # A broken install must not run a show without its control surface.
            raise StartupError(f"OSC control cannot be loaded ({e}); reinstall streamnode, or run with --no-osc") from e
        rt = self.config.runtime
        self._osc = OscServer(self.config.osc, self.queue, self.status, live=self.live,
                              max_brushes=rt.max_brushes, max_loras=rt.max_loras,
                              limits={"lfo": rt.max_lfos, "cues": rt.max_cues, "controlnet": rt.max_controlnets},
                              beat=self.tempo.position)
        try:
            self._osc.start()
        except OscStartError as e:
            self._osc = None
            raise StartupError(str(e)) from None

    def _spawn(self, name: str, work: Callable[[threading.Event], None], stop: threading.Event, *,
               restart: bool) -> threading.Thread:
        thread = spawn_guarded(name, work, stop, on_fatal=self.fail, restart=restart)
        self._threads.append(thread)
        return thread

    def run(self, stop: threading.Event | None = None) -> int:
        """Start, serve until `stop` is set or the run is complete, shut down; return an exit code."""
        stop = stop or threading.Event()
        self.start()
        try:
            return self._supervise(stop)
        finally:
            self.stop()

    def _supervise(self, stop: threading.Event) -> int:
        rt = self.config.runtime
        next_metrics = time.monotonic() + rt.metrics_interval_s
        while not stop.wait(TICK_S):
            now = time.monotonic()
            self._sample_rates(now)
            if self._fatal is not None:
                logger.error("stopping: %s", self._fatal)
                return EXIT_FAILURE
            if now >= next_metrics:
                next_metrics = now + rt.metrics_interval_s
                self._log_metrics()
            # Counted from the first output: loading a model (or building TensorRT engines) first
            # must not eat a scripted run's time.
            if rt.duration is not None and self._t_streaming and now - self._t_streaming >= rt.duration:
                logger.info("%.3g s of output: done", rt.duration)
                break
            if not any(t.is_alive() for t in self._threads if t.name.startswith(("engine", "sink:"))):
                break  # the source ended or max_frames was reached, and every sink has its frames
        return EXIT_OK

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop capture, let the engine finish its frame, let the sinks send what they hold, close all."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout

        def left(reserve: float = 0.0) -> float:
            return max(0.0, deadline - time.monotonic() - reserve)

        self._capture_stop.set()
        if self._surfaces is not None:
            self._surfaces.stop_event.set()  # MIDI and Art-Net readers: nothing more to the queue
        self.ring.close()
        self._engine_stop.set()
        self._aborted.set()
        for thread in self._threads:
            # The engine finishes the frame it is on (it cannot be interrupted); the sinks then
            # need only moments to send what they hold.
            if thread.name in ("capture", "engine", "present"):
                thread.join(left(0.2))
        self.loader.close(min(0.1, left(0.2)))
        self.lora_loader.close(min(0.1, left(0.2)))
        self.controlnet_loader.close(min(0.1, left(0.2)))
        self.control_maps.close(min(0.5, left(0.3)))
        self.outputs.end()  # the engine thread does this too when it exits normally
        for slot in self.outputs.slots:
            if slot.thread is not None:
                slot.thread.join(left(0.3))
                slot.stop.set()
        for slot in self.outputs.slots:
            if slot.thread is not None:
                slot.thread.join(left(0.1))
        if self._surfaces is not None:
            self._surfaces.close(min(0.5, left(0.1)))
        stuck = self.busy_threads()
        if stuck:
            logger.warning("threads still busy at the shutdown deadline: %s", ", ".join(stuck))
        self._close_transports(skip=set(stuck))
        if self._osc is not None:
            self._osc.stop(max(0.2, left()))
            self._osc = None
        self.tempo.close()
        logger.info("stopped: %s", self.summary())

    def finish_output(self) -> None:
        """The engine thread ends: stop the presenter, end every sink's mailbox, release the engine."""
        self._present_stop.set()
        for thread in self._threads:
            if thread.name == "present" and thread is not threading.current_thread():
                thread.join(1.0)
        self.outputs.end()
        self.mask_channels.close()
        self.control_maps.close()
        engine, self.engine = self.engine, None
        if engine is not None:
            self._last_stats = dict(engine.stats)
            engine.close()

    @property
    def sinks(self) -> list[Sink]:
        """The sinks, in the order of `config.sinks` (a preview's URL, a sink's counters)."""
        return [slot.sink for slot in self.outputs.slots]

    def busy_threads(self) -> list[str]:
        """Worker threads still running (after `stop()`: the ones that missed the deadline)."""
        return [t.name for t in self._threads if t.is_alive()]

    def _close_transports(self, skip: set[str] | None = None) -> None:
        skip = skip or set()
        # A transport is closed by the node only once the thread that used it has ended.
        if self._source is not None and "capture" not in skip:
            close_quietly(self._source)
        for slot in self.outputs.slots:
            if slot.thread_name not in skip:
                close_quietly(slot.sink)
                slot.is_open = False

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the threads share (each written by the thread named in the class docstring) ----

    def install_engine(self, engine: Engine, config: NodeConfig) -> None:
        """The engine thread takes `engine` (built for `config`) as the node's engine."""
        self.engine, self.config = engine, config
        self.publish_live()

    def set_switches(self, **changes: Any) -> None:
        self.switches = self.switches.model_copy(update=changes)
        if "pause" in changes and self._state in ("streaming", "paused"):
            self._state = "paused" if self.switches.pause else "streaming"
        self.publish_live()

    def publish_live(self) -> None:
        """Rebuild the `LiveState` everyone reads: the engine's snapshot with the node's own values
        and the brushes' shm channels laid over it (engine thread)."""
        engine = self.engine
        state = engine.live_params() if engine is not None else LiveState()
        bindings = self.mask_channels.bindings()
        if bindings:
            brushes = dict(state.brushes)
            for index, uri in bindings.items():
                if index in brushes:
                    brush = brushes[index]
                    brushes[index] = BrushState(brush.params.model_copy(update={"shm": uri}), brush.mask_array)
            state = state.replace(brushes=brushes)
        self._live = state.replace(node=self.switches.model_copy(update={"model": self.config.model.id}),
                                   lfos=self.tempo.lfos, cues=self.tempo.cues)

    def live(self) -> LiveState:
        """Every live value in force (immutable; any thread)."""
        return self._live

    def recent_input(self) -> np.ndarray | None:
        return self._engine_loop.recent_input()

    def show(self, out: np.ndarray, tags: list[tuple[int, int]]) -> bool:
        """A result (or a bypassed input) to the sinks, through the presenter when there is one
        (then it is the only writer of the mailboxes). False once the output is complete."""
        if self.presenter is not None:
            self.presenter.submit(out, tags)
            return not self.outputs.complete.is_set()
        return self.outputs.publish_all(out, tags)

    def engine_call_done(self, ms: float) -> None:
        """Timing of a successful engine call; the first one marks the start of streaming."""
        if not self._t_streaming:
            # The first call includes the one-off stream fill: not a frame time.
            logger.info("first frame in %.0f ms; streaming", ms)
            # Frames that arrived while the model loaded were never meant to be shown.
            self._dropped_before = self.ring.dropped
            if self.freeze_heap:
                heap.settle()  # before the first frame leaves: no full collection stops the picture later
            self._t_streaming = time.monotonic()
        else:
            self._engine_ms = ms if self._engine_ms == 0.0 else 0.9 * self._engine_ms + 0.1 * ms
            self.tempo.call_done(ms)
        if self._state in ("warming_up", "error"):
            self._state = "paused" if self.switches.pause else "streaming"

    def set_state(self, state: str) -> None:
        self._state = state

    def set_error(self, message: str) -> None:
        self._error = message

    def fail(self, message: str) -> None:
        """The node cannot go on: error state, said over OSC, and `run()` returns exit code 1."""
        self._error = message
        self._state = "error"
        self._fatal = message

    @property
    def engine_ms(self) -> float:
        """The engine call time, smoothed (0 before the second call), for status and logs."""
        return self._engine_ms

    @property
    def frames_in(self) -> int:
        return self._capture.frames_in if self._capture is not None else 0

    @property
    def frames_out(self) -> int:
        return self.outputs.frames_out

    @property
    def engine_failures(self) -> int:
        return self._engine_loop.failures

    def _build_engine(self, config: NodeConfig) -> Engine:
        return build_engine(config, progress=self._on_build_progress)

    def _on_build_progress(self, event: Any) -> None:
        """TensorRT export/build events: the console shows the progress; before streaming, the
        state says so (a model switch builds while the old engine streams)."""
        if not self._t_streaming:
            if event.stage in ("export", "build"):
                self._state = "building_engine"
            elif self._state == "building_engine":
                self._state = "loading_model"
        if self._progress is None:
            from streamnode.accel.progress import ConsoleProgress

            self._progress = ConsoleProgress()
        self._progress(event)

    # -- status ------------------------------------------------------------------------

    @property
    def osc_port(self) -> int | None:
        """The UDP port the OSC server bound (the real one when the config asked for port 0)."""
        return self._osc.port if self._osc is not None else None

    def _sample_rates(self, now: float) -> None:
        self._rate_in.sample(self.frames_in, now)
        self._rate_out.sample(self.frames_out, now)

    def status(self) -> dict[str, Any]:
        """A snapshot for OSC, the web preview and logs (any thread)."""
        if self._started and not self._stopped:
            self._sample_rates(time.monotonic())  # also when the caller drives start()/stop() itself
        p50, p95 = self.outputs.latency.percentiles()
        engine = self.engine
        stats = engine.stats if engine is not None else self._last_stats
        live = self._live
        capture = self._capture
        return {
            "state": self._state,
            "fps_in": round(self._rate_in.fps, 2),
            "fps_out": round(self._rate_out.fps, 2),
            "engine_ms": round(self._engine_ms, 2),
            "latency_ms_p50": p50,
            "latency_ms_p95": p95,
            "dropped": self.ring.dropped - self._dropped_before,
            "skipped": int(stats.get("skipped", 0)),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "error": self._error,
            "params": live.params.model_dump(mode="json"),
            "pause": live.node.pause,
            "bypass": live.node.bypass,
            "preset": live.node.preset,
            "model": self.config.model.id,
            "loading_model": self.loader.loading,
            "source": {
                "uri": self._source.uri if self._source is not None else None,
                "receiving": capture.connected if capture is not None else False,
                "holding": capture.holding if capture is not None else False,
                "ended": capture.ended if capture is not None else False,
            },
            "sinks": [
                {"uri": s.sink.uri, "open": s.is_open, "sent": s.sent, "dropped": s.mailbox.dropped, "errors": s.errors}
                for s in self.outputs.slots
            ],
            "brushes": {
                str(i): live.brushes[i].params.model_dump(mode="json", exclude_defaults=True) for i in live.brush_order
            },
            "brush_order": list(live.brush_order),
            "loras": {str(i): p.model_dump(mode="json") for i, p in live.loras.items()},
            "controlnets": {str(i): p.model_dump(mode="json") for i, p in live.controlnets.items()},
            "control_maps_in": self.control_maps.status(),
            "control_map_errors": self.control_maps.errors(),
            "tempo": self.tempo.status(),
            "size": [self.width, self.height],
            "uptime_s": round(time.monotonic() - self._t_start, 2) if self._t_start else 0.0,
        }

    def summary(self) -> str:
        st = self.status()
        if not self._t_streaming:
            # Never streamed (a model that would not load, a stop during start-up): a frame rate
            # of 0 over the start-up time would read as a slow node, not a failed start.
            return f"no frames out: {st['error']}" if st["error"] else f"no frames out (stopped while {st['state']})"
        # Output rate over the streaming time: model loading and the one-off stream fill are
        # start-up, reported on their own line, not a frame rate.
        elapsed = max(1e-9, time.monotonic() - self._t_streaming)
        return (
            f"{st['frames_out']} frames out in {elapsed:.1f} s of streaming ({st['frames_out'] / elapsed:.1f} fps), "
            f"engine {st['engine_ms']:.1f} ms, latency p50 {_ms(st['latency_ms_p50'])} / p95 "
            f"{_ms(st['latency_ms_p95'])}, dropped {st['dropped']}, skipped {st['skipped']}"
        )

    def _log_metrics(self) -> None:
        st = self.status()
        logger.info(
            "%s | fps in %.1f out %.1f | engine %.1f ms | latency p50 %s p95 %s | dropped %d skipped %d%s",
            st["state"], st["fps_in"], st["fps_out"], st["engine_ms"], _ms(st["latency_ms_p50"]),
            _ms(st["latency_ms_p95"]), st["dropped"], st["skipped"], f" | {st['error']}" if st["error"] else "",
        )


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"
