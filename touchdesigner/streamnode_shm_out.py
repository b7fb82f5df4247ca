"""Script TOP callbacks: send a TouchDesigner TOP to a streamnode node through `shm://`.

Connect the TOP you want the node to transform into a Script TOP's input, paste this file into
the Script TOP's callbacks DAT, press "Setup Parameters", set "Shared memory name" (`td_in`),
and start the node with `--source shm://td_in`. README.md has the whole patch.

Written against docs/shm-format.md, version 1 (the writer's side): create the segment, fill the
header, and for frame n: slot frame_number := 0, pixels and timestamp, frame_number := n, then
the header's timestamp and frame_counter := n. Only the standard library and numpy; the top half
is plain Python, tested outside TouchDesigner by feeding a live node.
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
HEADER = struct.Struct("<4sHHIIIIIIQQII8x")  # the full 64-byte header
HEADER_SIZE = SLOT_HEADER_SIZE = 64
SLOTS = 3
STATE_LIVE, STATE_CLOSED = 1, 2
RGB, BGR, RGBA, BGRA = 1, 2, 3, 4
CHANNELS = {RGB: 3, BGR: 3, RGBA: 4, BGRA: 4}


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """Create/attach without Python's resource tracker (POSIX, Python < 3.13): it would start a
    helper process with sys.executable, which inside TouchDesigner is TouchDesigner itself."""
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


def _open(name: str, size: int = 0) -> shared_memory.SharedMemory:
    create = size > 0
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    with _untracked():
        return shared_memory.SharedMemory(name=name, create=create, size=size)


def _unlink(name: str) -> None:
    """Remove a segment by name (POSIX). Windows frees it when its last handle closes."""
    if os.name != "posix":
        return
    import _posixshmem  # what SharedMemory.unlink() uses, without the resource-tracker message

    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs. (Never os.kill(pid, 0) on Windows: that terminates it.)"""
    if pid <= 0:
        return False
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def slot_size(width: int, height: int, channels: int) -> int:
    return -(-(SLOT_HEADER_SIZE + width * height * channels) // 64) * 64


class ShmFrameWriter:
    """Publishes frames as `shm://NAME` for a node's `--source shm://NAME`.

    `write(pixels)` takes H×W×C uint8, top row first, in `pixel_format` channel order, and
    returns the frame's number. A segment left behind by a dead writer is replaced; one whose
    writer is alive is not (RuntimeError names its pid). `close()` marks the segment closed and
    removes it; safe twice.
    """

    def __init__(self, name: str, width: int, height: int, pixel_format: int = RGB) -> None:
        if pixel_format not in CHANNELS:
            raise ValueError(f"pixel_format must be 1 (RGB), 2 (BGR), 3 (RGBA) or 4 (BGRA), not {pixel_format}")
        self.name, self.width, self.height = name, width, height
        self.pixel_format, self.channels = pixel_format, CHANNELS[pixel_format]
        self.slot_size = slot_size(width, height, self.channels)
        self.shm = self._create(HEADER_SIZE + SLOTS * self.slot_size)
        self.frame = 0
        self._closed = False
        HEADER.pack_into(self.shm.buf, 0, MAGIC, VERSION, HEADER_SIZE, width, height, self.channels,
                         pixel_format, SLOTS, self.slot_size, 0, 0, os.getpid(), STATE_LIVE)
        for i in range(SLOTS):
            struct.pack_into("<QQ", self.shm.buf, HEADER_SIZE + i * self.slot_size, 0, 0)

    def _create(self, size: int) -> shared_memory.SharedMemory:
        try:
            return _open(self.name, size)
        except FileExistsError:
            pass
        old = _open(self.name)
        try:
            magic, _, _, _, _, _, _, _, _, _, _, pid, state = HEADER.unpack_from(old.buf, 0)
            if magic == MAGIC and state == STATE_LIVE and pid != os.getpid() and pid_alive(pid):
                raise RuntimeError(f"shm://{self.name} is being written by process {pid}; choose another name")
            if os.name != "posix" and old.size >= size:
                return old  # Windows: a reader still holds the dead writer's segment; take it over
        except Exception:
            old.close()
            raise
        old.close()
        if os.name != "posix":
            raise RuntimeError(f"shm://{self.name} is still open elsewhere and too small for "
                               f"{self.width}x{self.height}; restart the node or choose another name")
        _unlink(self.name)
        return _open(self.name, size)

    def write(self, pixels: np.ndarray, timestamp_ns: int | None = None) -> int:
        if self._closed:
            raise RuntimeError("write() after close()")
        shape = (self.height, self.width, self.channels)
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise ValueError(f"expected a {shape} uint8 frame, got {pixels.shape} {pixels.dtype}")
        n = self.frame + 1
        t = time.monotonic_ns() if timestamp_ns is None else timestamp_ns
        buf, slot = self.shm.buf, HEADER_SIZE + (n % SLOTS) * self.slot_size
        # 1. mark the slot busy, 2. pixels and time, 3. the slot's number, 4. publish.
        struct.pack_into("<Q", buf, slot, 0)
        view = np.frombuffer(buf, np.uint8, pixels.size, slot + SLOT_HEADER_SIZE).reshape(shape)
        view[...] = pixels
        del view  # a live view would stop close() from unmapping the segment
        struct.pack_into("<Q", buf, slot + 8, t)
        struct.pack_into("<Q", buf, slot, n)
        struct.pack_into("<Q", buf, 40, t)
        struct.pack_into("<Q", buf, 32, n)
        self.frame = n
        return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        struct.pack_into("<I", self.shm.buf, 52, STATE_CLOSED)  # readers let go at once
        self.shm.close()
        _unlink(self.name)


def from_td(image: np.ndarray) -> np.ndarray:
    """TOP.numpyArray() (float32 0..1, or uint8/uint16; bottom row first; 1–4 channels) →
    H×W×3 uint8 RGB, top row first, as the shm format wants it."""
    if image.ndim == 2:
        image = image[:, :, None]
    rgb = image[::-1, :, :3]
    if rgb.shape[2] < 3:  # a mono (or two-channel) TOP: show its first channel as grey
        rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if rgb.dtype == np.uint16:
        return (rgb >> 8).astype(np.uint8)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# -- TouchDesigner callbacks ------------------------------------------------------------------------

_writers: dict[int, ShmFrameWriter] = {}


def onSetupParameters(scriptOp: Any) -> None:
    page = scriptOp.appendCustomPage("Streamnode")
    page.appendStr("Shmname", label="Shared memory name")
    scriptOp.par.Shmname.default = "td_in"
    scriptOp.par.Shmname.val = "td_in"
    page.appendPulse("Release", label="Release segment")


def onPulse(par: Any) -> None:
    if par.name == "Release":
        writer = _writers.pop(par.owner.id, None)
        if writer is not None:
            writer.close()


def onCook(scriptOp: Any) -> None:
    scriptOp.clearScriptErrors()
    if not scriptOp.inputs:
        scriptOp.addScriptError("connect the TOP to send to this Script TOP's input")
        return
    image = scriptOp.inputs[0].numpyArray(delayed=True)  # last frame's download: no GPU stall
    if image is None:
        return
    frame = from_td(image)
    name = str(scriptOp.par.Shmname.eval()).strip() if hasattr(scriptOp.par, "Shmname") else "td_in"
    writer = _writers.get(scriptOp.id)
    h, w = frame.shape[:2]
    if writer is None or (writer.name, writer.width, writer.height) != (name, w, h):
        if writer is not None:
            writer.close()  # a new size means a new segment; the node re-opens it by name
            del _writers[scriptOp.id]
        try:
            writer = _writers[scriptOp.id] = ShmFrameWriter(name, w, h)
        except (RuntimeError, OSError, ValueError) as e:
            scriptOp.addScriptError(str(e))
            return
    writer.write(frame)
    scriptOp.copyNumpyArray(image)  # pass the input through, so the TOP shows what is sent
