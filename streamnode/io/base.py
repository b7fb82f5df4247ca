"""Source and Sink protocols, the URI registry, and the retry policy every transport shares.

A transport is a small class registered under a URI scheme (`register_source("ndi", NdiSource)`).
`create_source("ndi://Studio A", options)` parses the URI, imports the transport's module
(and its optional package) only then, and lets the class build itself from the URI with
`from_uri()`. A missing package or platform raises `TransportUnavailable` naming what to install.

Contracts (after pyvirtualcam's backends):

- `open()` acquires the resource; it may fail with any exception and be called again later.
- `read()` / `send()` are only called between a successful `open()` and `close()`, from one
  thread at a time.
- `close()` releases everything and is safe to call twice, or after a failed `open()`.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl

import numpy as np

from streamnode.frames import Frame

logger = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """A transport URI is wrong or its resource cannot be opened; the message says how to fix it."""


class TransportUnavailable(TransportError):
    """A package, platform or driver the transport needs is missing; retrying will not help."""


class SourceLost(ConnectionError):
    """A live source went away (unplugged, sender stopped). The node holds the last frame and reopens."""


class SourceEnded(EOFError):
    """A finite source (a file played once) has no more frames."""


@dataclass(frozen=True)
class TransportOptions:
    """What the node tells every transport it creates; URI parameters override these."""

    width: int = 512  # the node's output size: sinks' frame size, test patterns' default size
    height: int = 512
    fps: float = 30.0  # the node's rate: paces test patterns and image folders; sinks' nominal rate
    loop: bool = True  # file sources start again at the end
    realtime: bool = True  # False for --no-drop renders: file sources read as fast as they are consumed
    ndi_discovery: tuple[str, ...] = ()  # extra NDI discovery addresses (networks without mDNS)
    status: Callable[[], dict[str, Any]] | None = field(default=None, compare=False)  # node metrics, for the web preview


@runtime_checkable
class Source(Protocol):
    """Produces RGB frames (`uint8`, `H×W×3`, C-contiguous) in the source's own size.

    `read(timeout)` waits at most about `timeout` seconds and returns a frame, or None when none
    came (a slow or not yet present source: not an error). It raises `SourceLost` when the
    source went away and `SourceEnded` at the end of a finite source. The returned array may
    be reused by the next `read()`: copy what you keep.
    """

    uri: str
    fps: float | None  # the source's own rate when it knows it (a video file), else None

    def open(self) -> None: ...

    def read(self, timeout: float) -> np.ndarray | None: ...

    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Consumes the node's output frames (RGB, the node's output size).

    `send()` runs on the sink's own thread and may block; it never slows the engine or other
    sinks. A sink with `pace_fps` set is fed at that steady rate, repeating the last frame when
    no new one came (virtual cameras expect a steady clock); otherwise once per new frame.
    """

    uri: str
    pace_fps: float | None

    def open(self) -> None: ...

    def send(self, frame: Frame) -> None: ...

    def close(self) -> None: ...


# -- URIs ----------------------------------------------------------------------------------


def parse_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """`"ndi://Studio A?bandwidth=lowest"` → `("ndi", "Studio A", {"bandwidth": "lowest"})`.

    The target is kept verbatim (NDI names have spaces, webcam names brackets); only a trailing
    `?key=value&...` is split off.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme.isidentifier():
        raise TransportError(f"{uri!r} is not a URI: write scheme://target, e.g. test://bars, ndi://Studio A")
    target, _, query = rest.partition("?")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise TransportError(f"{uri!r}: parameters must read ?key=value&key=value") from None
    return scheme.lower(), target, params


class UriParams:
    """The `?key=value` parameters of one URI, read with types; unknown keys are an error."""

    def __init__(self, uri: str, params: dict[str, str]) -> None:
        self.uri = uri
        self._params = dict(params)
        self._known: list[str] = []

    def _take(self, key: str) -> str | None:
        self._known.append(key)
        return self._params.pop(key, None)

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        raw = self._take(key)
        if raw is None:
            return default
        if choices and raw not in choices:
            raise TransportError(f"{self.uri}: {key}={raw!r} must be one of {', '.join(choices)}")
        return raw

    def number(self, key: str, default: float | None = None, minimum: float = 0.0) -> float | None:
        raw = self._take(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value >= minimum or value == float("inf"):
            raise TransportError(f"{self.uri}: {key}={raw!r} must be a number ≥ {minimum:g}")
        return value

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int | None:
        raw = self._take(key)
        if raw is None:
            return default
        if not raw.lstrip("-").isdigit() or int(raw) < minimum:
            raise TransportError(f"{self.uri}: {key}={raw!r} must be a whole number ≥ {minimum}")
        return int(raw)

    def flag(self, key: str, default: bool) -> bool:
        raw = self._take(key)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on", ""):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise TransportError(f"{self.uri}: {key}={raw!r} must be 1 or 0")

    def size(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        raw = self._take(key)
        if raw is None:
            return default
        w, sep, h = raw.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or not (0 < int(w) <= 8192 and 0 < int(h) <= 8192):
            raise TransportError(f"{self.uri}: {key}={raw!r} must read WIDTHxHEIGHT, e.g. 640x360")
        return int(w), int(h)

    def done(self) -> None:
        """Call after reading every parameter: leftovers are typos, and say so."""
        if self._params:
            allowed = ", ".join(self._known) or "none"
            raise TransportError(f"{self.uri}: unknown parameter {', '.join(self._params)}; allowed: {allowed}")


# -- registry ------------------------------------------------------------------------------

_SOURCES: dict[str, type | str] = {
    "test": "streamnode.io.test_pattern:TestPatternSource",
    "file": "streamnode.io.file:FileSource",
    "webcam": "streamnode.io.webcam:WebcamSource",
    "ndi": "streamnode.io.ndi:NdiSource",
    "spout": "streamnode.io.spout:SpoutSource",
    "shm": "streamnode.io.shm:ShmSource",
}
_SINKS: dict[str, type | str] = {
    "null": "streamnode.io.null:NullSink",
    "file": "streamnode.io.file:FileSink",
    "ndi": "streamnode.io.ndi:NdiSink",
    "spout": "streamnode.io.spout:SpoutSink",
    "shm": "streamnode.io.shm:ShmSink",
    "vcam": "streamnode.io.vcam:VcamSink",
    "http": "streamnode.io.preview:PreviewSink",
}


def register_source(scheme: str, cls: type | str) -> None:
    """Register (or replace) the Source class for `scheme://`; `cls` may be "module:Class" (imported on use)."""
    _SOURCES[scheme.lower()] = cls


def register_sink(scheme: str, cls: type | str) -> None:
    """Register (or replace) the Sink class for `scheme://`; `cls` may be "module:Class" (imported on use)."""
    _SINKS[scheme.lower()] = cls


def source_schemes() -> list[str]:
    return sorted(_SOURCES)


def sink_schemes() -> list[str]:
    return sorted(_SINKS)


def _resolve(registry: dict[str, type | str], scheme: str, kind: str, uri: str) -> type:
    entry = registry.get(scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in sorted(registry))
        raise TransportError(f"{uri!r}: no {kind} for {scheme}://; {kind}s: {known}")
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), class_name)
        registry[scheme] = entry
    return entry


def create_source(uri: str, options: TransportOptions | None = None) -> Source:
    """Build the source for `uri` without opening it (the node's capture thread opens and retries)."""
    scheme, target, params = parse_uri(uri)
    cls = _resolve(_SOURCES, scheme, "source", uri)
    return cls.from_uri(uri, target, UriParams(uri, params), options or TransportOptions())


def create_sink(uri: str, options: TransportOptions | None = None) -> Sink:
    """Build the sink for `uri` without opening it."""
    scheme, target, params = parse_uri(uri)
    cls = _resolve(_SINKS, scheme, "sink", uri)
    return cls.from_uri(uri, target, UriParams(uri, params), options or TransportOptions())


def open_source(uri: str, options: TransportOptions | None = None) -> Source:
    """Build and open the source for `uri`; close it (or use `with`) when done."""
    source = create_source(uri, options)
    source.open()
    return source


def open_sink(uri: str, options: TransportOptions | None = None) -> Sink:
    """Build and open the sink for `uri`; close it (or use `with`) when done."""
    sink = create_sink(uri, options)
    sink.open()
    return sink


def require(module: str, package: str, extra: str, what: str) -> ModuleType:
    """Import an optional package, or say exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TransportUnavailable(
            f'{what} needs the {package} package ({e}): pip install "streamnode[{extra}]"'
        ) from None


class Transport:
    """Shared plumbing for the concrete transports: `with` support and a readable repr."""

    uri: str = ""
    fps: float | None = None
    pace_fps: float | None = None

    def open(self) -> None:  # pragma: no cover - every transport overrides it
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


# -- pacing ------------------------------------------------------------------------------


class Pacer:
    """Frame clock for sources that make their own frames (patterns, files) at `fps`."""

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self.next_due = time.monotonic()

    def reset(self) -> None:
        self.next_due = time.monotonic()

    def wait(self, timeout: float) -> bool:
        """Sleep until the next frame is due and return True, or return False after `timeout`."""
        now = time.monotonic()
        wait = self.next_due - now
        if wait > timeout:
            time.sleep(max(0.0, timeout))
            return False
        if wait > 0:
            time.sleep(wait)
        # More than a frame behind (a stalled machine): restart the clock rather than burst.
        self.next_due = max(self.next_due, now - self.interval) + self.interval
        return True


# -- retry ---------------------------------------------------------------------------------


class Retry:
    """Backoff between attempts to (re)open a transport, and one log line per outage.

    `failed(exc)` logs the first failure of an outage as a warning and later ones (a different
    message aside) at debug level, so a source that stays away for an hour writes one line, not
    thousands. `succeeded()` logs the recovery.
    """

    def __init__(self, what: str, first: float = 0.25, longest: float = 5.0, log: logging.Logger = logger) -> None:
        self.what = what
        self.first = first
        self.longest = longest
        self.log = log
        self.attempts = 0
        self.next_at = 0.0
        self._last_message = ""
        self._since = 0.0

    @property
    def failing(self) -> bool:
        return self.attempts > 0

    def ready(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.next_at

    def wait_s(self, now: float | None = None) -> float:
        return max(0.0, self.next_at - (time.monotonic() if now is None else now))

    def failed(self, exc: BaseException | str) -> None:
        now = time.monotonic()
        message = str(exc) or type(exc).__name__
        if self.attempts == 0:
            self._since = now
            self.log.warning("%s: %s; retrying", self.what, message)
        elif message != self._last_message:
            self.log.warning("%s: %s (still retrying)", self.what, message)
        else:
            self.log.debug("%s: attempt %d failed: %s", self.what, self.attempts + 1, message)
        self._last_message = message
        # The exponent is capped: 2**1024 is beyond a float, and a camera unplugged for a long
        # break fails that many times (about 77 minutes at 5 s).
        delay = min(self.longest, self.first * 2.0 ** min(self.attempts, 32))
        # Jitter: several nodes waiting for the same sender do not retry in lockstep.
        self.next_at = now + delay * random.uniform(0.8, 1.0)
        self.attempts += 1

    def succeeded(self) -> None:
        if self.attempts:
            self.log.info(
                "%s: back after %.1f s (%d attempts)", self.what, time.monotonic() - self._since, self.attempts
            )
        self.attempts = 0
        self.next_at = 0.0
        self._last_message = ""
