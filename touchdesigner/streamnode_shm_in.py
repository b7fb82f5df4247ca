"""Script TOP callbacks: show a streamnode node's `shm://` output in TouchDesigner.

Start the node with a shared-memory sink, e.g.

    streamnode run --preset sd-turbo --source shm://td_in --sink shm://sn_out

then create a Script TOP, paste this file into its callbacks DAT, press "Setup Parameters",
and set "Shared memory name" to `sn_out`. README.md has the whole patch (with
streamnode_shm_out.py feeding the node).

Written against docs/shm-format.md, version 1: a 64-byte header ("SNFR"), three slots, a
tear-free protocol (a slot's frame number is 0 while the writer fills it, and is read again
after the copy). Only the standard library and numpy; no streamnode import, so it runs in
TouchDesigner's own Python. The top half is plain Python, tested outside TouchDesigner
against a live node; the TouchDesigner callbacks are at the bottom.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

import numpy as np

MAGIC = b"SNFR"
VERSION = 1
HEADER = struct.Struct("<4sHHIIIIIIQQII")  # magic … state; 8 reserved bytes follow
FRAME_COUNTER_AT, SLOT_PIXELS_AT = 32, 64
RGB, BGR, RGBA, BGRA = 1, 2, 3, 4
STATE_CLOSED = 2
STALE_S = 2.0  # no new frame for this long: let go of the segment (the node may have restarted)
RETRY_S = 1.0  # how often to look for the segment while it is missing
MAX_RETRIES = 4  # torn copies in a row before giving up on this cook (the reader is far too slow)


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """Attach without Python's resource tracker (POSIX, Python < 3.13).

    The tracker would delete the node's segment when this process exits, and it starts a helper
    process with sys.executable, which inside TouchDesigner is TouchDesigner itself.
    """
    if os.name != "posix" or sys.version_info >= (3, 13):
        yield
        return
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None  # type: ignore[assignment]
    try:
        yield
    finally:
        resource_tracker.register = register


def attach(name: str) -> shared_memory.SharedMemory:
    """Open a writer's segment for reading, never taking ownership. FileNotFoundError if absent."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    with _untracked():
        return shared_memory.SharedMemory(name=name)


class Header:
    """The header fields that matter to a reader, validated against the segment's size."""

    def __init__(self, buf: Any, size: int) -> None:
        if size < 64:
            raise ValueError(f"segment of {size} bytes is too small for a streamnode header")
        (magic, version, self.header_size, self.width, self.height, self.channels, self.pixel_format,
         self.slot_count, self.slot_size, self.frame_counter, self.timestamp_ns, self.writer_pid,
         self.state) = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ValueError(f"not a streamnode frame segment (magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"shm format version {version}; this script reads version {VERSION}")
        frame_bytes = self.width * self.height * self.channels
        if (self.channels not in (3, 4) or self.pixel_format not in (RGB, BGR, RGBA, BGRA) or self.slot_count < 1
                or self.slot_size < SLOT_PIXELS_AT + frame_bytes
                or self.header_size + self.slot_count * self.slot_size > size):
            raise ValueError("inconsistent shm header (sizes do not fit the segment)")


class ShmFrameReader:
    """Newest frames from a `shm://NAME` writer, whole or not at all.

    `read()` returns `(frame_number, timestamp_ns, pixels)` for a frame newer than the last one
    returned (pixels: H×W×C uint8, top row first, channel order per `pixel_format`), or None.
    It never blocks and never raises for a missing, closed or restarted writer: it attaches when
    the segment appears, and lets go when the writer closes or stops for `stale_s`, so a
    restarted node can publish under the same name (on Windows a segment lives while anyone
    holds it). `error` says why nothing comes. `close()` is safe twice.
    """

    def __init__(self, name: str, stale_s: float = STALE_S, retry_s: float = RETRY_S) -> None:
        self.name = name
        self.stale_s = stale_s
        self.retry_s = retry_s
        self.shm: shared_memory.SharedMemory | None = None
        self.header: Header | None = None
        self.last = 0
        self.error = ""
        self.torn = 0  # copies thrown away because the writer reused the slot meanwhile
        self._next_attach = 0.0
        self._last_progress = 0.0

    def _attach(self, now: float) -> bool:
        if now < self._next_attach:
            return False
        self._next_attach = now + self.retry_s
        try:
            shm = attach(self.name)
        except FileNotFoundError:
            self.error = f"no shared memory named {self.name!r} yet (is the node running with --sink shm://{self.name}?)"
            return False
        except OSError as e:
            self.error = f"cannot open shared memory {self.name!r}: {e}"
            return False
        try:
            Header(shm.buf, shm.size)
        except ValueError as e:
            shm.close()
            self.error = f"{self.name}: {e}"
            return False
        self.shm, self.last, self.error, self._last_progress = shm, 0, "", now
        return True

    def _release(self, why: str) -> None:
        if self.shm is not None:
            self.shm.close()
        self.shm, self.header, self.error = None, None, why

    def read(self, now: float | None = None) -> tuple[int, int, np.ndarray] | None:
        t = time.monotonic() if now is None else now
        if self.shm is None and not self._attach(t):
            return None
        shm = self.shm
        assert shm is not None
        try:
            header = Header(shm.buf, shm.size)
        except ValueError as e:
            self._release(f"{self.name}: {e}")
            return None
        self.header = header
        if header.state == STATE_CLOSED:
            self._release(f"the writer of {self.name!r} closed it")
            return None
        for _ in range(MAX_RETRIES):
            (n,) = struct.unpack_from("<Q", shm.buf, FRAME_COUNTER_AT)
            if n == 0 or n == self.last:
                if t - self._last_progress > self.stale_s:
                    self._release(f"no new frame in {self.name!r} for {self.stale_s:.0f} s")
                return None
            slot = header.header_size + (n % header.slot_count) * header.slot_size
            if struct.unpack_from("<Q", shm.buf, slot)[0] != n:
                self.torn += 1
                continue  # the writer has moved on: take the newer frame
            (timestamp,) = struct.unpack_from("<Q", shm.buf, slot + 8)
            count = header.width * header.height * header.channels
            pixels = np.frombuffer(shm.buf, np.uint8, count, slot + SLOT_PIXELS_AT)
            pixels = pixels.reshape(header.height, header.width, header.channels).copy()
            if struct.unpack_from("<Q", shm.buf, slot)[0] == n:
                self.last, self._last_progress = n, t
                return n, timestamp, pixels
            self.torn += 1
        return None

    def close(self) -> None:
        self._release("closed")


def to_td_rgba(pixels: np.ndarray, pixel_format: int) -> np.ndarray:
    """A frame as the shm format stores it → what Script TOP.copyNumpyArray takes: RGBA uint8,
    bottom row first (TouchDesigner's images start at the bottom)."""
    h, w, c = pixels.shape
    out = np.empty((h, w, 4), np.uint8)
    order = [2, 1, 0] if pixel_format in (BGR, BGRA) else [0, 1, 2]
    out[..., :3] = pixels[::-1, :, order]
    out[..., 3] = pixels[::-1, :, 3] if c == 4 else 255
    return out


def latency_ms(timestamp_ns: int) -> float:
    """Capture → now, for a frame written on this machine (the format's clock is system-wide)."""
    return (time.monotonic_ns() - timestamp_ns) / 1e6


# -- TouchDesigner callbacks ------------------------------------------------------------------------
# Per-operator state: one callbacks DAT may serve several Script TOPs.

_readers: dict[int, ShmFrameReader] = {}
_last_image: dict[int, np.ndarray] = {}


def onSetupParameters(scriptOp: Any) -> None:
    page = scriptOp.appendCustomPage("Streamnode")
    page.appendStr("Shmname", label="Shared memory name")
    scriptOp.par.Shmname.default = "sn_out"
    scriptOp.par.Shmname.val = "sn_out"


def onPulse(par: Any) -> None:
    return


def onCook(scriptOp: Any) -> None:
    name = str(scriptOp.par.Shmname.eval()).strip() if hasattr(scriptOp.par, "Shmname") else "sn_out"
    reader = _readers.get(scriptOp.id)
    if reader is None or reader.name != name:
        if reader is not None:
            reader.close()
        reader = _readers[scriptOp.id] = ShmFrameReader(name)
    got = reader.read()
    scriptOp.clearScriptErrors()
    if got is not None and reader.header is not None:
        _last_image[scriptOp.id] = to_td_rgba(got[2], reader.header.pixel_format)
    elif reader.error and reader.shm is None:
        scriptOp.addScriptError(reader.error)  # shown on the node: why there is no picture
    image = _last_image.get(scriptOp.id)
    if image is not None:
        scriptOp.copyNumpyArray(image)  # the last good frame until a newer one arrives
