"""shm:// — frames through named shared memory, for programs on the same machine.

    --sink shm://sn_out                 publish RGB frames (TouchDesigner Script TOP, a test, ...)
    --sink shm://sn_out?format=rgba     ... as RGBA (or bgr, bgra)
    --source shm://td_out               read frames another program publishes in the same format

The segment layout and the tear-free protocol are in docs/shm-format.md: a 64-byte header
(magic, version, width, height, channels, pixel format, frame counter, timestamp, writer pid)
and three slots, each with its own frame number that the writer clears before and sets after
writing the pixels, so a reader can tell a clean copy from a torn one.

The writer creates and removes the segment. A segment left behind by a writer that crashed is
removed by the next writer of that name, or by a reader that notices the writer is dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import time
from multiprocessing import shared_memory
from typing import NamedTuple

import cv2
import numpy as np

from streamnode.frames import Frame
from streamnode.io.base import Transport, TransportError, TransportOptions, UriParams

logger = logging.getLogger(__name__)

MAGIC = b"SNFR"
VERSION = 1
HEADER_SIZE = 64
SLOT_HEADER_SIZE = 64
SLOTS = 3
# magic, version, header_size, width, height, channels, pixel_format, slot_count, slot_size,
# frame_counter, timestamp_ns, writer_pid, state, 8 reserved bytes
HEADER = struct.Struct("<4sHHIIIIIIQQII8x")
assert HEADER.size == HEADER_SIZE
OFF_FRAME_COUNTER, OFF_TIMESTAMP, OFF_PID, OFF_STATE = 32, 40, 48, 52
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
STATE_LIVE, STATE_CLOSED = 1, 2

PIXEL_FORMATS = {"rgb": (1, 3), "bgr": (2, 3), "rgba": (3, 4), "bgra": (4, 4)}
_FORMAT_NAMES = {code: name for name, (code, _) in PIXEL_FORMATS.items()}
# output RGB → segment format, and segment format → RGB
_TO_SEGMENT = {"bgr": cv2.COLOR_RGB2BGR, "rgba": cv2.COLOR_RGB2RGBA, "bgra": cv2.COLOR_RGB2BGRA}
_FROM_SEGMENT = {"bgr": cv2.COLOR_BGR2RGB, "rgba": cv2.COLOR_RGBA2RGB, "bgra": cv2.COLOR_BGRA2RGB}

_MAX_NAME = 30  # macOS caps POSIX shared-memory names at 31 bytes including the leading slash
_created_here: set[str] = set()  # segments this process created (and its resource tracker owns)


def check_name(name: str, uri: str) -> str:
    if not name or len(name) > _MAX_NAME or not all(c.isalnum() or c in "_-." for c in name):
        raise TransportError(f"{uri}: the segment name must be 1-{_MAX_NAME} letters, digits, _ - or ., e.g. shm://sn_out")
    return name


def slot_size(width: int, height: int, channels: int) -> int:
    """Bytes from one slot to the next: slot header + pixels, rounded up to 64."""
    return -(-(SLOT_HEADER_SIZE + width * height * channels) // 64) * 64


def segment_size(width: int, height: int, channels: int, slots: int = SLOTS) -> int:
    return HEADER_SIZE + slots * slot_size(width, height, channels)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's exit delete it.

    Before Python 3.13, attaching registers the segment with the resource tracker, which
    unlinks it when this process ends, taking it away from the writer and its other readers.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    shm = shared_memory.SharedMemory(name=name)
    if name not in _created_here:
        _untrack(shm)
    return shm


def _unlink(name: str) -> None:
    """Remove a segment by name without tracker bookkeeping (it is not ours to track)."""
    if os.name != "posix":
        return  # Windows frees a segment when its last handle closes: nothing can leak
    import _posixshmem  # what SharedMemory.unlink() calls, minus the resource-tracker message

    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Tell this process's resource tracker (Python < 3.13, POSIX) to forget a segment."""
    if os.name == "posix" and sys.version_info < (3, 13):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (POSIX; elsewhere always True). A zombie counts as dead."""
    if pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _segment_id(name: str) -> int | None:
    """Identity of the segment the name points at now (Linux), to notice a re-created segment."""
    try:
        return os.stat(f"/dev/shm/{name}").st_ino
    except OSError:
        return None


class Header(NamedTuple):
    magic: bytes
    version: int
    header_size: int
    width: int
    height: int
    channels: int
    pixel_format: int
    slot_count: int
    slot_size: int
    frame_counter: int
    timestamp_ns: int
    writer_pid: int
    state: int


def read_header(shm: shared_memory.SharedMemory) -> Header:
    if shm.size < HEADER_SIZE:
        raise TransportError(f"shm://{shm.name.lstrip('/')}: {shm.size} bytes is too small for a frame segment")
    return Header(*HEADER.unpack_from(shm.buf, 0))


def _slot_views(shm: shared_memory.SharedMemory, header: Header) -> list[np.ndarray]:
    """One numpy view per slot's pixels (they pin the buffer: drop them before `shm.close()`)."""
    shape = (header.height, header.width, header.channels)
    return [
        np.ndarray(shape, np.uint8, shm.buf, header.header_size + i * header.slot_size + SLOT_HEADER_SIZE)
        for i in range(header.slot_count)
    ]


class ShmSink(Transport):
    """Writes each output frame into the next slot of a shared-memory segment it owns."""

    def __init__(self, name: str, width: int, height: int, *, pixel_format: str = "rgb", uri: str = "") -> None:
        self.uri = uri or f"shm://{name}"
        self.name = check_name(name, self.uri)
        if pixel_format not in PIXEL_FORMATS:
            raise TransportError(f"{self.uri}: format={pixel_format!r}: use one of {', '.join(PIXEL_FORMATS)}")
        self.pixel_format = pixel_format
        self.width, self.height = width, height
        self.channels = PIXEL_FORMATS[pixel_format][1]
        self.frames = 0
        self._shm: shared_memory.SharedMemory | None = None
        self._views: list[np.ndarray] = []
        self._slot_size = 0
        self._segment_id: int | None = None
        self._next_check = 0.0

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> ShmSink:
        fmt = params.text("format", "rgb", choices=tuple(PIXEL_FORMATS))
        params.done()
        return cls(target, options.width, options.height, pixel_format=fmt, uri=uri)

    def open(self) -> None:
        self.close()
        size = segment_size(self.width, self.height, self.channels)
        try:
            shm = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        except FileExistsError:
            self._remove_stale()
            shm = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        _created_here.add(self.name)
        self._shm = shm
        self._slot_size = slot_size(self.width, self.height, self.channels)
        HEADER.pack_into(
            shm.buf, 0, MAGIC, VERSION, HEADER_SIZE, self.width, self.height, self.channels,
            PIXEL_FORMATS[self.pixel_format][0], SLOTS, self._slot_size, 0, 0, os.getpid(), STATE_LIVE,
        )
        for i in range(SLOTS):
            U64.pack_into(shm.buf, HEADER_SIZE + i * self._slot_size, 0)
        self._views = _slot_views(shm, read_header(shm))
        self._segment_id = _segment_id(self.name)
        self._next_check = time.monotonic() + 1.0
        logger.info("%s: %dx%d %s frames in shared memory %r (%d bytes)", self.uri, self.width, self.height,
                    self.pixel_format.upper(), self.name, size)

    def _remove_stale(self) -> None:
        """A segment of this name exists: take it over if its writer is dead, else refuse."""
        try:
            old = _attach(self.name)
        except FileNotFoundError:
            return
        try:
            header: Header | None = read_header(old)
        except TransportError:
            header = None
        finally:
            old.close()
        if header is None or header.magic != MAGIC:
            raise TransportError(
                f"{self.uri}: a shared-memory segment named {self.name!r} exists and is not a streamnode frame "
                "segment; choose another name"
            )
        pid = header.writer_pid
        if header.state != STATE_CLOSED and pid != os.getpid() and pid_alive(pid):
            raise TransportError(f"{self.uri}: process {pid} is already writing {self.name!r}; choose another name")
        logger.warning("%s: removing the segment %r a crashed writer (pid %d) left behind", self.uri, self.name, pid)
        _unlink(self.name)

    def send(self, frame: Frame) -> None:
        shm = self._shm
        assert shm is not None, "send() before open()"
        image = frame.image
        if image.shape[:2] != (self.height, self.width):
            # The output size changed (a model switch): readers see a new segment.
            self.height, self.width = image.shape[:2]
            self.open()
            shm = self._shm
            assert shm is not None
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 1.0
            self._check_still_there()
            shm = self._shm
            assert shm is not None
        n = self.frames + 1
        slot = n % SLOTS
        offset = HEADER_SIZE + slot * self._slot_size
        buf = shm.buf
        # Seqlock on the slot: 0 while the pixels change, the frame number once they are whole.
        U64.pack_into(buf, offset, 0)
        if self.pixel_format == "rgb":
            np.copyto(self._views[slot], image)
        else:
            cv2.cvtColor(image, _TO_SEGMENT[self.pixel_format], dst=self._views[slot])
        U64.pack_into(buf, offset + 8, frame.t_capture)
        U64.pack_into(buf, offset, n)
        U64.pack_into(buf, OFF_TIMESTAMP, frame.t_capture)
        U64.pack_into(buf, OFF_FRAME_COUNTER, n)
        self.frames = n

    def _check_still_there(self) -> None:
        # A reader on Python < 3.13 that forgot to unregister from its resource tracker deletes
        # the segment when it exits; publish a new one under the same name instead of writing
        # into memory nobody can find.
        if self._segment_id is not None and _segment_id(self.name) != self._segment_id:
            logger.warning("%s: the segment %r was removed by another process; creating it again", self.uri, self.name)
            frames = self.frames
            self._release(unlink=False)
            self.open()
            self.frames = frames

    def _release(self, unlink: bool) -> None:
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._views = []  # numpy views pin the buffer: drop them before closing
        U32.pack_into(shm.buf, OFF_STATE, STATE_CLOSED)
        shm.close()
        # Remove the name only while it still points at our segment, never a newer writer's.
        if unlink and _segment_id(self.name) in (self._segment_id, None):
            _unlink(self.name)
        _untrack(shm)
        _created_here.discard(self.name)

    def close(self) -> None:
        self._release(unlink=True)


class ShmSource(Transport):
    """Reads the newest whole frame from a segment another process writes.

    Waits for the segment to appear, follows a writer that restarts (a new segment under the
    same name), and removes the segment of a writer that died without removing it.
    """

    def __init__(self, name: str, *, uri: str = "") -> None:
        self.uri = uri or f"shm://{name}"
        self.name = check_name(name, self.uri)
        self.fps = None
        self.torn = 0  # copies discarded because the writer overwrote the slot meanwhile
        self._shm: shared_memory.SharedMemory | None = None
        self._views: list[np.ndarray] = []
        self._geometry: tuple[int, int, int, int] = (0, 0, 0, 0)  # header_size, slots, slot_size, format
        self._rgb = np.zeros((0, 0, 3), np.uint8)
        self._last = 0
        self._last_new = 0.0
        self._segment_id: int | None = None
        self._waiting_logged = False

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> ShmSource:
        params.done()
        return cls(target, uri=uri)

    def open(self) -> None:
        self.close()
        self._waiting_logged = False

    def _attach(self) -> bool:
        try:
            shm = _attach(self.name)
        except FileNotFoundError:
            if not self._waiting_logged:
                logger.warning("%s: waiting for a writer to create shared memory %r", self.uri, self.name)
                self._waiting_logged = True
            return False
        try:
            header = read_header(shm)
            if header.magic != MAGIC or header.version != VERSION:
                raise TransportError(
                    f"{self.uri}: {self.name!r} is not a version-{VERSION} streamnode frame segment "
                    "(see docs/shm-format.md)"
                )
            fmt = _FORMAT_NAMES.get(header.pixel_format)
            if (fmt is None or PIXEL_FORMATS[fmt][1] != header.channels or header.slot_count < 2
                    or shm.size < header.header_size + header.slot_count * header.slot_size):
                raise TransportError(f"{self.uri}: the header of {self.name!r} is inconsistent: {header}")
        except BaseException:
            shm.close()
            raise
        self._shm = shm
        self._views = _slot_views(shm, header)
        self._geometry = (header.header_size, header.slot_count, header.slot_size, header.pixel_format)
        h, w = header.height, header.width
        if self._rgb.shape != (h, w, 3):
            self._rgb = np.zeros((h, w, 3), np.uint8)
        self._last = header.frame_counter - 1 if header.frame_counter else 0
        self._last_new = time.monotonic()
        self._segment_id = _segment_id(self.name)
        self._waiting_logged = False
        logger.info("%s: reading %dx%d %s frames (writer pid %d)", self.uri, w, h, fmt.upper(), header.writer_pid)
        return True

    def read(self, timeout: float) -> np.ndarray | None:
        deadline = time.monotonic() + timeout
        while True:
            if self._shm is None and not self._attach():
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                return None
            image = self._poll()
            if image is not None:
                return image
            if time.monotonic() >= deadline:
                return None
            # Shared memory has no wake-up signal; 1 ms polls keep the added latency under that.
            time.sleep(0.001)

    def _poll(self) -> np.ndarray | None:
        shm = self._shm
        assert shm is not None
        buf = shm.buf
        hsize, slots, size, fmt = self._geometry
        for _ in range(slots + 1):
            n = U64.unpack_from(buf, OFF_FRAME_COUNTER)[0]
            if n == 0 or n == self._last:
                break
            slot = n % slots
            offset = hsize + slot * size
            if U64.unpack_from(buf, offset)[0] != n:
                continue  # the writer has moved on to this slot; read the counter again
            view = self._views[slot]
            if fmt == PIXEL_FORMATS["rgb"][0]:
                np.copyto(self._rgb, view)
            else:
                cv2.cvtColor(view, _FROM_SEGMENT[_FORMAT_NAMES[fmt]], dst=self._rgb)
            if U64.unpack_from(buf, offset)[0] != n:
                self.torn += 1
                continue
            self._last = n
            self._last_new = time.monotonic()
            return self._rgb
        if time.monotonic() - self._last_new > 1.0:
            self._check_writer()
        return None

    def _check_writer(self) -> None:
        """No new frame for a while: has the writer closed, died, or made a new segment?"""
        shm = self._shm
        assert shm is not None
        self._last_new = time.monotonic()  # check once a second, not on every poll
        state = U32.unpack_from(shm.buf, OFF_STATE)[0]
        pid = U32.unpack_from(shm.buf, OFF_PID)[0]
        if state != STATE_CLOSED and pid_alive(pid):
            if self._segment_id is None or _segment_id(self.name) in (self._segment_id, None):
                return
            logger.info("%s: the writer created a new segment; following it", self.uri)
        elif state == STATE_CLOSED:
            logger.warning("%s: the writer closed %r; waiting for it to come back", self.uri, self.name)
        else:
            logger.warning("%s: the writer (pid %d) died; removing its segment and waiting", self.uri, pid)
            if _segment_id(self.name) == self._segment_id:
                _unlink(self.name)
        self._detach()
        self._waiting_logged = True

    def _detach(self) -> None:
        shm, self._shm = self._shm, None
        self._views = []
        if shm is not None:
            shm.close()

    def close(self) -> None:
        self._detach()
