"""The daemon: source → ring buffer → engine → per-sink mailboxes → sinks, with metrics and control.

Threads (DESIGN.md), each a plain worker function receiving its stop Event:

- `capture`: opens the source (retrying with backoff), fits each frame to the output size into
  the ring buffer, and while the source is away repeats the last frame (black after
  `source.lost_timeout_s`) so every sink keeps a picture.
- `engine`: the only owner of the model. Loads it, applies queued control updates between
  frames, runs one engine call per frame and copies the result into every sink's mailbox.
- `sink:<uri>`: one per sink, fed by a two-slot ring (latest wins), so a slow sink never slows
  the engine or the others. A failing sink is closed, reopened with backoff, and logged once.
- the caller's thread runs `Node.run()`: it watches duration, frame count and the end of a
  finite source, logs metrics every few seconds, and shuts down in order under a deadline.

`streamnode run` is `run_command()`; `streamnode sources` is `sources_command()`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from streamnode.config import ConfigError, NodeConfig, StreamConfig, load_config
from streamnode.control.updates import ENGINE_KEYS, ControlQueue, Update
from streamnode.frames import RingBuffer
from streamnode.io.base import (
    Retry,
    Sink,
    Source,
    SourceEnded,
    TransportError,
    TransportOptions,
    create_sink,
    create_source,
)
from streamnode.io.fit import Fitter

logger = logging.getLogger(__name__)

TICK_S = 0.05  # how often idle workers look at their stop Event
SHUTDOWN_TIMEOUT_S = 2.0
LATENCY_WINDOW = 512  # samples behind the p50/p95
RATE_WINDOW_S = 2.0  # fps is averaged over this long
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class StartupError(RuntimeError):
    """The node cannot start: a bad URI, a sink that cannot open, an engine that cannot load."""


# -- engines -------------------------------------------------------------------------------


class PassThroughEngine:
    """The engine interface without a model: returns the input resized to `width`×`height`.

    For transport tests and benchmarks (`--engine passthrough`), and a way to check a rig's
    video path before loading a model. The returned array is reused by the next call.
    """

    delay_calls = 0  # an output belongs to the input of the same call

    def __init__(self, width: int = 512, height: int = 512, **_: Any) -> None:
        self.width, self.height = width, height
        self._out = np.zeros((height, width, 3), np.uint8)
        self._outs: np.ndarray | None = None
        self._pattern_x = np.arange(width, dtype=np.int32)[None, :]
        self.params: dict[str, Any] = {}
        self.stats: dict[str, int] = {"frames": 0, "skipped": 0, "unet_calls": 0}

    @classmethod
    def from_pretrained(cls, model_id: str = "", *, width: int = 512, height: int = 512, **kwargs: Any) -> PassThroughEngine:
        return cls(width, height, **kwargs)

    def prepare(self, prompt: str = "", negative_prompt: str = "", guidance_scale: float = 1.0,
                delta: float = 1.0, **_: Any) -> None:
        self.params.update(prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale, delta=delta)

    def update(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - ENGINE_KEYS - {"brush"}
        if unknown:
            raise ValueError(f"unknown engine parameter(s): {', '.join(sorted(unknown))}")
        self.params.update(kwargs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.stats["frames"] += 1
        if image.ndim == 4:  # a frame_buffer_size batch
            if self._outs is None or self._outs.shape[0] != image.shape[0]:
                self._outs = np.zeros((image.shape[0], self.height, self.width, 3), np.uint8)
            for src, dst in zip(image, self._outs, strict=True):
                self._resize(src, dst)
            return self._outs
        return self._resize(image, self._out)

    def _resize(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if src.shape == dst.shape:
            np.copyto(dst, src)
        else:
            cv2.resize(src, (self.width, self.height), dst=dst, interpolation=cv2.INTER_AREA)
        return dst

    def txt2img(self) -> np.ndarray:
        """A moving gradient, so a txt2img pipeline test sees frames change."""
        self.stats["frames"] += 1
        shift = self.stats["frames"] * 4
        self._out[:, :, 0] = ((self._pattern_x + shift) % 256).astype(np.uint8)
        self._out[:, :, 1] = 128
        self._out[:, :, 2] = 255 - self._out[:, :, 0]
        return self._out


def stream_values(stream: StreamConfig) -> dict[str, Any]:
    """The live engine parameters a stream config sets (what `preset` applies without a restart)."""
    values = {key: getattr(stream, key) for key in sorted(ENGINE_KEYS) if hasattr(stream, key)}
    if values.get("strength") is None:
        values.pop("strength", None)  # unset: t_index_list decides
    else:
        values.pop("t_index_list", None)  # set: it is the one-step alias for t_index_list
    return values


def build_engine(config: NodeConfig, progress: Callable[[Any], None] | None = None) -> Any:
    """The engine for `config.runtime.engine`: loaded, accelerated (`model.accel`) and prepared
    with the config's stream values. `progress` receives TensorRT build events.

    The only place the node constructs an engine; torch is imported here, lazily, and only for
    the stream engine.
    """
    s, m = config.stream, config.model
    if config.runtime.engine == "passthrough":
        engine: Any = PassThroughEngine(s.width, s.height)
    else:
        from streamnode.accel import accelerate_with_config
        from streamnode.diffusion.models import node_cpu_threads
        from streamnode.diffusion.stream import StreamEngine

        engine = StreamEngine.from_pretrained(
            m.id, t_index_list=s.t_index_list, width=s.width, height=s.height,
            frame_buffer_size=s.frame_buffer_size, cfg_type=s.cfg_type, device=m.device, dtype=m.dtype,
            use_tiny_vae=m.use_tiny_vae, tiny_vae=m.tiny_vae, lcm_lora=m.lcm_lora, seed=s.seed,
            cpu_threads=m.cpu_threads or node_cpu_threads(), max_brushes=config.runtime.max_brushes,
        )
        accelerate_with_config(engine, m, progress=progress)
    engine.prepare(prompt=s.prompt, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale, delta=s.delta)
    rest = {k: v for k, v in stream_values(s).items()
            if k not in ("prompt", "negative_prompt", "guidance_scale", "delta", "t_index_list", "seed")}
    if rest:
        engine.update(**rest)
    return engine


def engine_live_params(engine: Any) -> dict[str, Any]:
    """What the engine really uses, in OSC terms: after `/prompt/blend` the prompt in force is the
    blend, after `/strength` the t_index_list is the one strength chose. The stream engine's
    `params` is an immutable snapshot replaced whole by `update()`, so any thread may read it."""
    live = getattr(engine, "params", None)
    if live is None or isinstance(live, dict):
        return {"t_index_list": list(engine.t_index_list)} if hasattr(engine, "t_index_list") else {}
    return {
        "prompt": live.prompt if live.prompt is not None else "",
        "prompt_blend": [list(pair) for pair in live.prompt_blend],
        "negative_prompt": live.negative_prompt,
        "prompt_transition_frames": live.prompt_transition_frames,
        "guidance_scale": live.guidance_scale,
        "delta": live.delta,
        "t_index_list": list(live.t_index_list),
        "strength": live.strength,
        "seed": live.seed if live.seed is not None else live.seed_blend[0][0],
        "seed_blend": [list(pair) for pair in live.seed_blend],
        "similarity_threshold": live.similarity_threshold,
        "similarity_max_skip": live.similarity_max_skip,
    }


def delay_calls(engine: Any, params: dict[str, Any]) -> int:
    """Engine calls between a frame going in and its result coming out: T−1 for a stream batch
    of T steps (DESIGN.md). The engine's own word first (`delay_calls`, or `steps`)."""
    delay = getattr(engine, "delay_calls", None)
    if delay is not None:
        return int(delay)
    steps = getattr(engine, "steps", None)
    if isinstance(steps, int):
        return max(0, steps - 1)
    return max(0, len(params.get("t_index_list") or [0]) - 1)


# -- metrics -------------------------------------------------------------------------------


class LatencyWindow:
    """The last `size` capture→sink latencies; percentiles on demand. Sink threads add to it."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples = np.zeros(size, np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples[self._count % len(self._samples)] = ms
            self._count += 1

    def percentiles(self) -> tuple[float | None, float | None]:
        with self._lock:
            n = min(self._count, len(self._samples))
            if n == 0:
                return None, None
            p50, p95 = np.percentile(self._samples[:n], [50, 95])
        return round(float(p50), 2), round(float(p95), 2)


class RateMeter:
    """Frames per second of a counter, averaged over the last `window` seconds."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._points: deque[tuple[float, int]] = deque()
        self.fps = 0.0

    def sample(self, count: int, now: float) -> float:
        self._points.append((now, count))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window:
            self._points.popleft()
        t0, c0 = self._points[0]
        self.fps = (count - c0) / (now - t0) if now > t0 else 0.0
        return self.fps


class LogLimiter:
    """At most one log line per key every `interval` seconds; says how many were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str) -> int | None:
        """None: stay quiet. Otherwise log now; the number is how many lines were held back."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)


@dataclass
class _SinkSlot:
    sink: Sink
    mailbox: RingBuffer
    retry: Retry
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    is_open: bool = False
    sent: int = 0
    errors: int = 0


# -- the node ------------------------------------------------------------------------------


class _GroupPresenter:
    """Live mode with `frame_buffer_size` F > 1: spreads the F results of one engine call over
    the time until the next call, instead of handing them to the sinks' latest-wins mailboxes
    back to back (where a sink would see only the last of each group).

    The engine thread `submit()`s a group (copied into the back buffer, so the engine may reuse
    its arrays); the presenter thread shows frame k of the front group at
    t_group + k·period/F, period being the smoothed time between groups. A newer group
    replaces what is left of an older one: live output shows the present.
    """

    def __init__(self, frames: int, height: int, width: int,
                 fan_out: Callable[[np.ndarray, list[tuple[int, int]]], None]) -> None:
        self._buffers = [np.zeros((frames, height, width, 3), np.uint8) for _ in range(2)]
        self._front = 0
        self._tags: list[tuple[int, int]] = []
        self._next = 0  # index in the front group of the next frame to show
        self._t_group = 0.0
        self._period = 0.0
        self._fan_out = fan_out
        self._cond = threading.Condition()

    def submit(self, out: np.ndarray, tags: list[tuple[int, int]]) -> None:
        with self._cond:
            back = 1 - self._front
            np.copyto(self._buffers[back], out)
            now = time.monotonic()
            if self._t_group:
                gap = now - self._t_group
                self._period = gap if not self._period else 0.8 * self._period + 0.2 * gap
            self._t_group = now
            self._front, self._tags, self._next = back, list(tags), 0
            self._cond.notify()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if self._next >= len(self._tags):
                    self._cond.wait(TICK_S)
                    continue
                k = self._next
                wait = self._t_group + k * self._period / len(self._tags) - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, TICK_S))  # woken early by a newer group
                    continue
                self._next += 1
                # Under the lock: the engine cannot swap buffers mid-copy. Live mailboxes never wait.
                self._fan_out(self._buffers[self._front][k], [self._tags[k]])


class Node:
    """One running node. `run()` blocks until done; or `start()`, then `stop()` from anywhere.

    `engine_factory(config)` builds the engine on the engine thread (default: `build_engine`, with
    TensorRT build progress shown on the console and in `status()["state"]`).
    `status()` is safe to call from any thread (the OSC server calls it a few times a second).
    """

    def __init__(self, config: NodeConfig, *, engine_factory: Callable[[NodeConfig], Any] | None = None) -> None:
        self.config = config
        self.engine_factory = engine_factory or self._build_engine
        self._progress: Callable[[Any], None] | None = None
        self.queue = ControlQueue()
        s = config.stream
        self.width, self.height = s.width, s.height
        self.txt2img = s.mode == "txt2img"
        self.no_drop = config.runtime.no_drop
        self.fps = config.source.fps
        self._state = "starting"
        self._error = ""
        self._params: dict[str, Any] = stream_values(s)
        self._paused = False
        self._bypass = False
        self._brushes: dict[int, dict[str, Any]] = {}
        self._mask_channels: Any = None  # io.shm_masks.MaskChannels, made when a brush reads shm://
        self._engine: Any = None
        self._source: Source | None = None
        self._sinks: list[_SinkSlot] = []
        self._ring = RingBuffer((s.height, s.width, 3), config.runtime.ring_slots, block=self.no_drop)
        self._capture_stop = threading.Event()
        self._engine_stop = threading.Event()
        self._engine_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._presenter = (
            _GroupPresenter(s.frame_buffer_size, s.height, s.width, self._fan_out)
            if s.frame_buffer_size > 1 and not self.no_drop else None
        )
        self._osc: Any = None
        self._started = False
        self._stopped = False
        self._fatal: str | None = None
        self._source_ended = False
        self._source_connected = False
        self._holding = False
        # Counters: each written by one thread only.
        self.frames_in = 0  # real frames from the source (not repeats while it is away)
        self.frames_out = 0  # engine results handed to the sinks
        self.engine_failures = 0
        self._dropped_before = 0
        self._engine_ms = 0.0
        self._latency = LatencyWindow()
        self._rate_in = RateMeter()
        self._rate_out = RateMeter()
        self._log_limit = LogLimiter()
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
            self._start_osc()
        except BaseException:
            self._close_transports()
            raise
        self._spawn("engine", self._engine_worker, self._engine_stop)
        if self._presenter is not None:
            self._spawn("present", self._presenter.run, self._engine_stop)
        if self._source is not None:
            self._spawn("capture", self._capture_worker, self._capture_stop)
        for slot in self._sinks:
            slot.thread = self._spawn(f"sink:{slot.sink.uri}", self._sink_worker, slot.stop, slot)

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
            for uri in c.sinks:
                sink = create_sink(uri, options)
                sink.open()
                mailbox = RingBuffer((self.height, self.width, 3), 2, block=self.no_drop)
                self._sinks.append(_SinkSlot(sink, mailbox, Retry(f"sink {uri}", log=logger), is_open=True))
        except TransportError as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"{e}") from None

    def _start_osc(self) -> None:
        if not self.config.osc.enabled:
            return
        try:
            from streamnode.control.osc import OscServer
        except ImportError:
            logger.warning("OSC control is not available in this build; running without it")
            return
        self._osc = OscServer(self.config.osc, self.queue, self.status, max_brushes=self.config.runtime.max_brushes)
        try:
            self._osc.start()
        except Exception as e:  # OscStartError: a port in use, a bad host
            self._osc = None
            raise StartupError(str(e)) from None

    def _spawn(self, name: str, target: Callable[..., None], stop: threading.Event, *args: Any) -> threading.Thread:
        # Daemon threads: one stuck in a driver call must not keep the process alive after
        # the shutdown deadline.
        thread = threading.Thread(target=target, args=(stop, *args), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
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
            self._rate_in.sample(self.frames_in, now)
            self._rate_out.sample(self.frames_out, now)
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
        self._ring.close()
        self._engine_stop.set()
        for thread in self._threads:
            # The engine finishes the frame it is on (it cannot be interrupted); the sinks then
            # need only moments to send what they hold.
            if thread.name in ("capture", "engine", "present"):
                thread.join(left(0.2))
        for slot in self._sinks:
            slot.mailbox.close()  # the engine does this too when it exits normally
        for slot in self._sinks:
            if slot.thread is not None:
                slot.thread.join(left(0.3))
                slot.stop.set()
        for slot in self._sinks:
            if slot.thread is not None:
                slot.thread.join(left(0.1))
        stuck = self.busy_threads()
        if stuck:
            logger.warning("threads still busy at the shutdown deadline: %s", ", ".join(stuck))
        self._close_transports(skip=set(stuck))
        if self._osc is not None:
            self._osc.stop(max(0.2, left()))
            self._osc = None
        logger.info("stopped: %s", self.summary())

    @property
    def sinks(self) -> list[Sink]:
        """The sinks, in the order of `config.sinks` (a preview's URL, a sink's counters)."""
        return [slot.sink for slot in self._sinks]

    def busy_threads(self) -> list[str]:
        """Worker threads still running (after `stop()`: the ones that missed the deadline)."""
        return [t.name for t in self._threads if t.is_alive()]

    def _close_transports(self, skip: set[str] | None = None) -> None:
        skip = skip or set()
        # A transport is closed by the node only once the thread that used it has ended.
        if self._source is not None and "capture" not in skip:
            _close_quietly(self._source)
        for slot in self._sinks:
            if f"sink:{slot.sink.uri}" not in skip:
                _close_quietly(slot.sink)
                slot.is_open = False

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- capture thread ----------------------------------------------------------------

    def _capture_worker(self, stop: threading.Event) -> None:
        source = self._source
        assert source is not None
        cfg = self.config.source
        fit = Fitter(self.width, self.height, cfg.fit)
        fitted = np.zeros((self.height, self.width, 3), np.uint8)  # also the frame held while the source is away
        retry = Retry(f"source {source.uri}", log=logger)
        is_open = False
        seq = 0
        last_real = time.monotonic()
        next_hold = 0.0
        had_frame = False
        black = True
        interval = 1.0 / self.fps
        if self.no_drop:
            # A render reads its input at the engine's pace: frames read while the model loads
            # would only wait in the ring (and show up as seconds of latency).
            while not self._engine_ready.wait(TICK_S):
                if stop.is_set():
                    return
        while not stop.is_set():
            image = None
            if not is_open and retry.ready():
                try:
                    source.open()
                    is_open = True
                except Exception as e:  # noqa: BLE001 - any open failure is retried
                    retry.failed(e)
                    _close_quietly(source)
            if is_open:
                # While holding, wake in time for the next repeat so the output keeps its rate.
                timeout = min(TICK_S, max(0.001, next_hold - time.monotonic())) if self._holding else TICK_S
                try:
                    image = source.read(timeout)
                except SourceEnded:
                    logger.info("%s: end of source", source.uri)
                    self._source_ended = True
                    break
                except Exception as e:  # noqa: BLE001 - a read failure means reopen, never crash
                    retry.failed(e)
                    _close_quietly(source)
                    is_open = False
            else:
                stop.wait(min(TICK_S, retry.wait_s(), max(0.001, next_hold - time.monotonic())))
            now = time.monotonic()
            if image is not None:
                if retry.failing:
                    retry.succeeded()
                if self._holding:
                    logger.info("%s: frames again after %.1f s", source.uri, now - last_real)
                    self._holding = False
                fit(image, fitted)
                last_real, had_frame, black = now, True, False
                self._source_connected = True
                seq += 1
                self.frames_in += 1
                self._put(stop, fitted, seq)
            elif not self.no_drop and now - last_real >= cfg.hold_after_s and now >= next_hold:
                # The source is away: keep the sinks fed with the last frame, black after a while.
                self._source_connected = False
                if not self._holding:
                    self._holding = True
                    what = "holding the last frame" if had_frame else "sending black until it comes"
                    logger.warning("%s: no frames for %.1f s; %s", source.uri, now - last_real, what)
                if not black and now - last_real >= cfg.lost_timeout_s:
                    fitted[:] = 0
                    black = True
                    logger.warning("%s: still no frames after %.3g s; sending black", source.uri, cfg.lost_timeout_s)
                # On time: keep the cadence. Far behind (or the first repeat): restart it from now.
                next_hold = (next_hold if now - next_hold < interval else now) + interval
                seq += 1
                self._put(stop, fitted, seq)
        self._ring.close()

    def _put(self, stop: threading.Event, image: np.ndarray, seq: int) -> None:
        t_capture = time.monotonic_ns()
        # Live: never waits. --no-drop: waits for the engine, looking at `stop` meanwhile.
        while not self._ring.put(image, seq, t_capture, timeout=TICK_S):
            if stop.is_set() or self._ring.closed:
                return

    # -- engine thread -----------------------------------------------------------------

    def _engine_worker(self, stop: threading.Event) -> None:
        try:
            self._state = "loading_model"
            try:
                engine = self.engine_factory(self.config)
            except Exception as e:  # noqa: BLE001 - reported as a startup failure
                logger.debug("engine failed to load", exc_info=True)
                self._fail(f"engine: {e}")
                return
            self._engine = engine
            if not self._setup_brushes(engine):
                return
            self._engine_ready.set()
            # The first call fills the stream batch (T−1 silent steps) and compiles lazy kernels.
            self._state = "warming_up"
            if self.txt2img:
                self._txt2img_loop(stop)
            else:
                self._img2img_loop(stop)
        except Exception as e:  # noqa: BLE001 - a bug here must stop the node, loudly, not hang it
            logger.exception("engine thread failed")
            self._fail(f"engine thread: {e}")
        finally:
            if self._mask_channels is not None:
                self._mask_channels.close()
            for slot in self._sinks:
                slot.mailbox.close()

    def _img2img_loop(self, stop: threading.Event) -> None:
        """One engine call per frame (per `frame_buffer_size` frames).

        Each result is tagged with the (seq, t_capture) of the input it came from, `delay` calls
        back, so the latency the sinks measure includes the stream batch. With --no-drop the
        first `delay` results (the warm-up) are dropped and the pipeline is flushed at the end,
        so the n-th output belongs to the n-th input and none is missing.
        """
        get = self._ring.get_next if self.no_drop else self._ring.get_latest
        frames_per_call = self.config.stream.frame_buffer_size
        batch = np.zeros((frames_per_call, self.height, self.width, 3), np.uint8) if frames_per_call > 1 else None
        pending: list[tuple[int, int]] = []  # tags of the frames gathered into `batch`
        history: deque[list[tuple[int, int]]] = deque(maxlen=delay_calls(self._engine, self._params) + 1)
        discard = history.maxlen - 1 if self.no_drop else 0
        last: tuple[np.ndarray, list[tuple[int, int]]] | None = None
        while not stop.is_set():
            if self._apply_updates():
                history = deque(history, maxlen=delay_calls(self._engine, self._params) + 1)
            frame = get(TICK_S)
            if frame is None:
                if self._ring.ended:
                    break
                continue
            if self._paused:
                continue  # the sinks keep the last output
            if self._bypass:
                self._fan_out(frame.image, [(frame.seq, frame.t_capture)])
                continue
            if batch is None:
                image, tags = frame.image, [(frame.seq, frame.t_capture)]
            else:
                np.copyto(batch[len(pending)], frame.image)
                pending.append((frame.seq, frame.t_capture))
                if len(pending) < frames_per_call:
                    continue
                image, tags, pending = batch, pending, []
            out = self._call(self._engine, image)
            if out is None:
                continue
            history.append(tags)
            last = (image, tags)
            if discard:
                discard -= 1
                continue
            if self._presenter is not None:
                self._presenter.submit(out, history[0])
            else:
                self._fan_out(out, history[0])
            if self._reached_max():
                return
        if self.no_drop and last is not None and not stop.is_set():
            # Flush: the last inputs' results are still inside the stream batch.
            image, tags = last
            for _ in range(delay_calls(self._engine, self._params)):
                out = self._call(self._engine, image)
                if out is not None:
                    history.append(tags)
                    self._fan_out(out, history[0])
                    if self._reached_max():
                        return

    def _txt2img_loop(self, stop: threading.Event) -> None:
        interval = 1.0 / self.fps
        next_due = time.monotonic()
        seq = 0
        while not stop.wait(max(0.0, next_due - time.monotonic())):
            next_due = max(next_due + interval, time.monotonic() - interval)
            self._apply_updates()
            if self._paused:
                continue
            t_capture = time.monotonic_ns()
            out = self._call(self._engine, None)
            if out is not None:
                rows = out.shape[0] if out.ndim == 4 else 1
                tags = [(seq + i + 1, t_capture) for i in range(rows)]
                if self._presenter is not None and rows > 1:
                    self._presenter.submit(out, tags)
                else:
                    self._fan_out(out, tags)
                seq += rows
                if self._reached_max():
                    return

    def _call(self, engine: Any, image: np.ndarray | None) -> np.ndarray | None:
        t0 = time.perf_counter()
        try:
            out = engine.txt2img() if image is None else engine(image)
        except Exception as e:  # noqa: BLE001 - one bad frame must not end the show
            self.engine_failures += 1
            self._error = f"engine: {e}"
            if self.engine_failures >= 3:
                self._state = "error"
            if (held := self._log_limit("engine-call")) is not None:
                logger.error("engine call failed (%d similar failures not logged): %s", held, e)
            return None
        ms = (time.perf_counter() - t0) * 1e3
        if self._state == "warming_up":
            # The first call includes the one-off stream fill: not a frame time.
            logger.info("first frame in %.0f ms; streaming", ms)
            # Frames that arrived while the model loaded were never meant to be shown.
            self._dropped_before = self._ring.dropped
            self._t_streaming = time.monotonic()
        else:
            self._engine_ms = ms if self._engine_ms == 0.0 else 0.9 * self._engine_ms + 0.1 * ms
        if self._state in ("warming_up", "error"):
            self._state = "paused" if self._paused else "streaming"
        self.engine_failures = 0
        return out

    def _fan_out(self, out: np.ndarray, tags: list[tuple[int, int]]) -> None:
        """Copy each result frame into every sink's mailbox; `tags` are their (seq, t_capture)."""
        for image, (seq, t_capture) in zip(out if out.ndim == 4 else (out,), tags, strict=True):
            for slot in self._sinks:
                # Live: latest wins, never waits. --no-drop: waits for the slowest sink.
                while not slot.mailbox.put(image, seq, t_capture, timeout=TICK_S):
                    if slot.mailbox.closed or self._engine_stop.is_set():
                        break
            self.frames_out += 1

    def _reached_max(self) -> bool:
        limit = self.config.runtime.max_frames
        if limit is not None and self.frames_out >= limit:
            logger.info("%d frames out: done", self.frames_out)
            return True
        return False

    def _fail(self, message: str) -> None:
        self._error = message
        self._state = "error"
        self._fatal = message

    def _build_engine(self, config: NodeConfig) -> Any:
        return build_engine(config, progress=self._on_build_progress)

    def _on_build_progress(self, event: Any) -> None:
        """TensorRT export/build events: the state says so, and the console shows the progress."""
        if event.stage in ("export", "build"):
            self._state = "building_engine"
        elif self._state == "building_engine":
            self._state = "loading_model"
        if self._progress is None:
            from streamnode.accel.progress import ConsoleProgress

            self._progress = ConsoleProgress()
        self._progress(event)

    # -- control (engine thread, between frames) ----------------------------------------

    def _apply_updates(self) -> bool:
        """Apply what the control queue holds; True if anything was applied."""
        self._poll_brush_masks()
        updates = self.queue.drain()
        applied = False
        for update in updates:
            try:
                self._apply(update)
            except Exception as e:  # noqa: BLE001 - a bad value is reported, never fatal
                self._error = f"{update.key}: {e}"
                if (held := self._log_limit(f"update:{update.key}")) is not None:
                    logger.warning("cannot apply %s=%r: %s%s", update.key, update.value, e,
                                   f" ({held} similar not logged)" if held else "")
                continue
            applied = True
            self.queue.applied(update)
        return applied

    def _apply(self, update: Update) -> None:
        key, value = update.key, update.value
        engine = self._engine
        if key in ENGINE_KEYS:
            engine.update(**{key: value})
            self._params[key] = value
            # strength and t_index_list set the same thing: the newer one is what counts.
            if key == "t_index_list":
                self._params.pop("strength", None)
            elif key == "strength":
                self._params.pop("t_index_list", None)
        elif key == "pause":
            self._paused = bool(value)
            if self._state in ("streaming", "paused"):
                self._state = "paused" if self._paused else "streaming"
        elif key == "bypass":
            self._bypass = bool(value)
        elif key == "preset":
            self._apply_preset(str(value))
        elif key == "model":
            self._switch_model(str(value))
        elif key == "brush":
            self._apply_brush(value)
        else:
            raise KeyError(f"unknown control key {key!r}")

    def _apply_preset(self, name: str) -> None:
        cfg = load_config(preset=name)
        values = stream_values(cfg.stream)
        self._engine.update(**values)
        self._params.update(values)
        s, now = cfg.stream, self.config.stream
        fixed = [k for k in ("width", "height", "frame_buffer_size", "cfg_type", "mode") if getattr(s, k) != getattr(now, k)]
        if cfg.model.id != self.config.model.id:
            fixed.append("model")
        if fixed:
            logger.info("preset %s: live values applied; %s need a restart", name, ", ".join(fixed))

    def _switch_model(self, model_id: str) -> None:
        if not self.config.osc.allow_model_switch:
            raise PermissionError("switching models is off; start the node with --allow-model-switch")
        config = self.config.model_copy(update={"model": self.config.model.model_copy(update={"id": model_id})})
        previous = self._state
        self._state = "loading_model"
        # The old engine keeps the show going until the new one is ready (and if it fails).
        try:
            engine = self.engine_factory(config)
            live = {k: v for k, v in self._params.items() if k in ENGINE_KEYS}
            if live:
                engine.update(**live)
            self._replay_brushes(engine)
        except BaseException:
            self._state = previous
            raise
        old, self._engine = self._engine, engine
        self.config = config
        self._state = "paused" if self._paused else "streaming"
        if not isinstance(old, PassThroughEngine) and hasattr(old, "unet_call"):
            from streamnode.accel import restore

            restore(old)  # releases its TensorRT engines now rather than whenever it is collected
        logger.info("model switched to %s", model_id)

    # -- brushes (regional prompts; engine thread) ----------------------------------------

    _MASK_SOURCES = ("mask", "rect", "circle", "shm")

    def _apply_brush(self, value: tuple[int, str, Any], engine: Any = None) -> None:
        """One brush edit (index, BrushConfig field or "clear", value): to the engine, or for
        `shm`, to the mask-channel reader that feeds the engine the brush's plane."""
        engine = engine or self._engine
        index, field_name, field_value = value
        i = int(index)
        if not 0 <= i < self.config.runtime.max_brushes:
            raise ValueError(f"brush {index}: use 0..{self.config.runtime.max_brushes - 1}")
        if field_name == "shm":
            from streamnode.io.shm_masks import MaskChannels

            if self._mask_channels is None:
                self._mask_channels = MaskChannels()
            self._mask_channels.bind(i, str(field_value))  # validates the URI before the engine changes
            # Until the channel delivers this brush's plane, the brush paints nothing.
            engine.update(brush=(i, "mask", None))
        else:
            engine.update(brush=(i, field_name, field_value))
            if field_name in ("mask", "rect", "circle", "clear") and self._mask_channels is not None:
                self._mask_channels.unbind(i)
        # Copy on write: status() iterates these from other threads.
        brushes = dict(self._brushes)
        if field_name == "clear":
            brushes.pop(i, None)
        else:
            fields = dict(brushes.get(i, {}))
            if field_name in self._MASK_SOURCES:
                # One mask source in force: the status shows it, and a replay applies only it.
                for key in self._MASK_SOURCES:
                    fields.pop(key, None)
            fields[field_name] = field_value
            brushes[i] = fields
        self._brushes = brushes

    def _setup_brushes(self, engine: Any) -> bool:
        """The config's `[[brushes]]` onto a new engine, before the first frame; False (and the node
        fails with the reason) when one cannot be applied, e.g. a missing mask file."""
        for i, brush in enumerate(self.config.brushes):
            try:
                for field_name, field_value in brush.model_dump(exclude_defaults=True).items():
                    self._apply_brush((i, field_name, field_value), engine)
            except Exception as e:  # noqa: BLE001 - a bad preset brush is a startup failure, reported
                self._fail(f"brush {i}: {e}")
                return False
        return True

    def _replay_brushes(self, engine: Any) -> None:
        """Every brush in force onto a new engine (a model switch), with the same numbers."""
        for i, fields in self._brushes.items():
            edit = {k: v for k, v in fields.items() if k != "shm"}
            if "shm" in fields:
                edit["mask"] = None  # the channel delivers the plane again at the next poll
                self._mask_channels.bind(i, fields["shm"])
            engine.update(brush=(i, edit))

    def _poll_brush_masks(self) -> None:
        """Hand the engine the brush masks that changed in shm:// mask channels (a header read when none did)."""
        if not self._mask_channels:
            return
        for i, mask in self._mask_channels.poll():
            try:
                self._engine.update(brush=(i, "mask", mask))
            except Exception as e:  # noqa: BLE001 - a bad plane is reported, never fatal
                self._error = f"brush {i} mask: {e}"
                if (held := self._log_limit(f"brush-mask:{i}")) is not None:
                    logger.warning("brush %d: cannot use its shm mask: %s%s", i, e,
                                   f" ({held} similar not logged)" if held else "")

    # -- sink threads ------------------------------------------------------------------

    def _sink_worker(self, stop: threading.Event, slot: _SinkSlot) -> None:
        mailbox, sink = slot.mailbox, slot.sink
        get = mailbox.get_next if self.no_drop else mailbox.get_latest
        # A paced sink (a virtual camera) gets a frame at least every `interval`, the last one
        # again when the engine is slower. A render (--no-drop) sends each frame once instead.
        interval = 1.0 / sink.pace_fps if sink.pace_fps and not self.no_drop else None
        next_due = time.monotonic()
        last_sent = -1e9
        held = None
        fresh_waiting = False
        sent_seq = -1
        while not stop.is_set():
            if interval is None:
                frame = get(TICK_S)
            else:
                fresh = get(min(TICK_S, max(0.0, next_due - time.monotonic())))
                if fresh is not None:
                    held, fresh_waiting = fresh, True
                now = time.monotonic()
                # A new frame goes out at once (no added latency) unless the camera took one
                # less than half a period ago. With nothing new, the last one is repeated on the
                # camera's clock, after half a period's grace so that an engine running at
                # about the camera's rate is never overtaken by a repeat (which would delay
                # its next frame by a whole period).
                if not ((fresh_waiting and now - last_sent >= interval / 2) or now >= next_due):
                    continue
                next_due = now + (1.5 * interval if fresh_waiting else interval)
                frame, fresh_waiting, last_sent = held, False, now
            if frame is None:
                if mailbox.ended:
                    break
                continue
            if not slot.is_open:
                if not slot.retry.ready():
                    continue
                try:
                    sink.open()
                    slot.is_open = True
                    slot.retry.succeeded()
                except Exception as e:  # noqa: BLE001 - retried with backoff
                    slot.retry.failed(e)
                    _close_quietly(sink)
                    continue
            try:
                sink.send(frame)
            except Exception as e:  # noqa: BLE001 - a failing sink is reopened, never fatal
                slot.errors += 1
                slot.retry.failed(e)
                _close_quietly(sink)
                slot.is_open = False
                continue
            slot.sent += 1
            if frame.seq != sent_seq:
                sent_seq = frame.seq
                self._latency.add((time.monotonic_ns() - frame.t_capture) / 1e6)
        mailbox.release()

    # -- status ------------------------------------------------------------------------

    @property
    def osc_port(self) -> int | None:
        """The UDP port the OSC server bound (the real one when the config asked for port 0)."""
        return self._osc.port if self._osc is not None else None

    def status(self) -> dict[str, Any]:
        """A snapshot for OSC, the web preview and logs (any thread)."""
        p50, p95 = self._latency.percentiles()
        engine = self._engine
        stats = getattr(engine, "stats", None) or {}
        params = dict(self._params)
        params.update(engine_live_params(engine))
        params.update(pause=self._paused, bypass=self._bypass)
        return {
            "state": self._state,
            "fps_in": round(self._rate_in.fps, 2),
            "fps_out": round(self._rate_out.fps, 2),
            "engine_ms": round(self._engine_ms, 2),
            "latency_ms_p50": p50,
            "latency_ms_p95": p95,
            "dropped": self._ring.dropped - self._dropped_before,
            "skipped": int(stats.get("skipped", 0)),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "error": self._error,
            "params": params,
            "pause": self._paused,
            "bypass": self._bypass,
            "source": {
                "uri": self._source.uri if self._source is not None else None,
                "receiving": self._source_connected,
                "holding": self._holding,
                "ended": self._source_ended,
            },
            "sinks": [
                {"uri": s.sink.uri, "open": s.is_open, "sent": s.sent, "dropped": s.mailbox.dropped, "errors": s.errors}
                for s in self._sinks
            ],
            "brushes": {str(i): dict(fields) for i, fields in self._brushes.items()},
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
        since = self._t_streaming
        elapsed = max(1e-9, time.monotonic() - since)
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


def _close_quietly(transport: Source | Sink) -> None:
    try:
        transport.close()
    except Exception:  # noqa: BLE001 - closing must go on for the others
        logger.debug("closing %s failed", getattr(transport, "uri", transport), exc_info=True)


# -- CLI: streamnode run -------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `streamnode run`. Short flags override the preset; `--set` overrides both."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", help="preset name (`streamnode presets` lists them)")
    g.add_argument("--config", metavar="FILE", help="a TOML file in preset format, instead of --preset")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set stream.guidance_scale=1.4 (repeatable)")
    g = parser.add_argument_group("video")
    g.add_argument("--source", help="test://moving, file://clip.mp4, webcam://0, ndi://Name, spout://Name, shm://name")
    g.add_argument("--sink", dest="sinks", action="append", metavar="URI",
                   help="output (repeatable; replaces the preset's): vcam://, ndi://Name, spout://Name, "
                        "shm://name, file://out.mp4, http://127.0.0.1:8080, null://")
    g.add_argument("--fit", choices=("cover", "contain", "stretch"), help="how sources fit the output size")
    g.add_argument("--width", type=int, help="output width (multiple of 8)")
    g.add_argument("--height", type=int, help="output height (multiple of 8)")
    g.add_argument("--prompt", help="the prompt to start with")
    g.add_argument("--no-drop", action="store_true", default=None,
                   help="process every frame in order (file renders), instead of always the newest")
    g.add_argument("--once", action="store_true", default=None, help="play a file source once, then stop")
    g.add_argument("--duration", type=float, metavar="S", help="stop S seconds after the first output frame")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N output frames")
    g.add_argument("--ndi-discovery", metavar="ADDR[,ADDR]",
                   help="extra NDI discovery addresses, for networks without mDNS (e.g. 127.0.0.1)")
    g = parser.add_argument_group("engine")
    g.add_argument("--engine", choices=("stream", "passthrough"),
                   help="stream: diffusion (default); passthrough: no model, input resized to the output")
    g.add_argument("--model", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    g.add_argument("--accel", choices=("auto", "eager", "compile", "tensorrt", "openvino"))
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps; with --accel openvino: CPU, GPU, GPU.N, NPU")
    g = parser.add_argument_group("control")
    g.add_argument("--osc-host", help="address to listen on for OSC (default 127.0.0.1)")
    g.add_argument("--osc-port", type=int, help="UDP port for OSC (default 7000; 0 picks one)")
    g.add_argument("--osc-reply", metavar="HOST:PORT", help="where replies and status go")
    g.add_argument("--osc-prefix", metavar="/NAME", help="address prefix, e.g. /vj1")
    g.add_argument("--osc-allow", metavar="CIDR[,CIDR]", help="networks allowed to send OSC")
    g.add_argument("--no-osc", action="store_true", default=None, help="no OSC server")
    g.add_argument("--oscquery-port", type=int, help="serve OSCQuery over HTTP on this port")
    g.add_argument("--allow-model-switch", action="store_true", default=None, help="allow /model over OSC")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


_FLAG_KEYS = {
    "source": "source.uri", "sinks": "sinks", "fit": "source.fit", "width": "stream.width",
    "height": "stream.height", "prompt": "stream.prompt", "no_drop": "runtime.no_drop", "duration": "runtime.duration",
    "max_frames": "runtime.max_frames", "ndi_discovery": "source.ndi_discovery", "engine": "runtime.engine",
    "model": "model.id", "accel": "model.accel", "device": "model.device", "osc_host": "osc.host",
    "osc_port": "osc.port", "osc_reply": "osc.reply", "osc_prefix": "osc.prefix", "osc_allow": "osc.allow",
    "oscquery_port": "osc.oscquery_port", "allow_model_switch": "osc.allow_model_switch",
    "log_level": "runtime.log_level",
}


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """NodeConfig from `run` flags: preset or --config file, then short flags, then --set."""
    overrides = {key: getattr(args, name) for name, key in _FLAG_KEYS.items() if getattr(args, name, None) is not None}
    if getattr(args, "once", None):
        overrides["source.loop"] = False
    if getattr(args, "no_osc", None):
        overrides["osc.enabled"] = False
    return load_config(preset=getattr(args, "preset", None), sets=getattr(args, "sets", None) or [],
                       overrides=overrides, preset_file=getattr(args, "config", None))


@contextlib.contextmanager
def _shutdown_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`; a second one exits at once. Old handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread; the caller stops us instead
        return

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            # The graceful path is stuck: leave now. The OS releases devices and sockets, and
            # the resource tracker removes our shared-memory segments.
            os.write(2, b"streamnode: forced exit\n")
            os._exit(130)
        logger.info("%s: shutting down (again to force)", signal.Signals(signum).name)
        stop.set()

    signums = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
    previous = {s: signal.signal(s, handle) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def run_command(args: argparse.Namespace) -> int:
    """`streamnode run`: exit 0 when stopped or done, 1 when the node cannot run, 2 for a bad config."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"streamnode run: {e}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(config.runtime.log_level)
    node = Node(config)
    stop = threading.Event()
    with _shutdown_signals(stop):
        try:
            code = node.run(stop)
        except StartupError as e:
            print(f"streamnode run: {e}", file=sys.stderr)
            return EXIT_FAILURE
    print(f"streamnode: {node.summary()}", file=sys.stderr)
    if node.busy_threads():
        # An engine call that outlived the deadline (a slow CPU model): its transports are closed
        # already, and letting the interpreter finalise under a running torch op aborts the
        # process. Leave now, with the exit code we mean.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The interpreter's last garbage collections walk torch's and transformers' whole object
    # graph: seconds, on a busy CPU, after everything is closed. Nothing left needs them.
    gc.freeze()
    return code


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root.setLevel(getattr(logging, level.upper()))


# -- CLI: streamnode sources ---------------------------------------------------------------


def add_sources_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ndi-discovery", metavar="ADDR[,ADDR]", default="",
                        help="extra NDI discovery addresses, e.g. 127.0.0.1")
    parser.add_argument("--wait", type=float, default=2.0, metavar="S", help="how long to listen for NDI senders")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def list_all_sources(ndi_discovery: tuple[str, ...] = (), wait_s: float = 2.0) -> dict[str, Any]:
    """What `streamnode sources` prints: {"ndi": [...], "webcam": [...], "spout": [...], "errors": {...}}."""
    found: dict[str, Any] = {"ndi": [], "webcam": [], "spout": [], "errors": {}}
    try:
        from streamnode.io import ndi

        found["ndi"] = [f"ndi://{name}" for name in ndi.list_sources(ndi_discovery, wait_s)]
    except TransportError as e:
        found["errors"]["ndi"] = str(e)
    from streamnode.io import webcam

    found["webcam"] = [f"{uri}  {desc}" for uri, desc in webcam.list_devices()]
    if sys.platform == "win32":
        try:
            from streamnode.io import spout

            found["spout"] = [f"spout://{name}" for name in spout.list_senders()]
        except TransportError as e:
            found["errors"]["spout"] = str(e)
    else:
        found["errors"]["spout"] = "Spout is Windows-only"
    return found


def sources_command(args: argparse.Namespace) -> int:
    discovery = tuple(a.strip() for a in (args.ndi_discovery or "").split(",") if a.strip())
    found = list_all_sources(discovery, args.wait)
    if args.json:
        print(json.dumps(found, indent=2))
        return EXIT_OK
    for kind, title in (("ndi", "NDI senders"), ("webcam", "capture devices"), ("spout", "Spout senders")):
        print(f"{title}:")
        for line in found[kind]:
            print(f"  {line}")
        if not found[kind]:
            print(f"  ({found['errors'].get(kind, 'none found')})")
    return EXIT_OK


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m streamnode.node", description="streamnode run")
    add_run_arguments(_parser)
    sys.exit(run_command(_parser.parse_args()))
