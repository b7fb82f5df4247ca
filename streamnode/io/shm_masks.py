"""shm:// mask channels: brush masks painted live by another program (docs/shm-format.md, "Mask channels").

A mask channel is a shared-memory segment with the frame segment's header and tear-free slot
protocol (shm.py), holding `channels` mask planes instead of pixels: pixel_format 16 (uint8,
0..255) or 17 (float32 in [0, 1]), planes stored one after another. Plane c is brush c's mask
(or the plane a brush names with `shm://NAME?plane=K`).

    writer = MaskChannelWriter("sn_masks", 64, 36, channels=2)   # a painting app, a test
    writer.write(planes)                                         # (2, 36, 64) uint8 or float
    channels = MaskChannels(); channels.bind(0, "shm://sn_masks")
    for brush, mask in channels.poll(): engine.update(brush=(brush, "mask", mask))

The node reads channels on its engine thread between frames (`MaskChannels.poll()` never
blocks: a header read when nothing changed), and hands the engine only the planes that changed.
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing import shared_memory

import numpy as np

from streamnode.io.base import TransportError
from streamnode.io.shm import (
    _FORMAT_NAMES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    OFF_FRAME_COUNTER,
    OFF_PID,
    OFF_STATE,
    OFF_TIMESTAMP,
    SLOT_HEADER_SIZE,
    SLOTS,
    STATE_CLOSED,
    STATE_LIVE,
    U32,
    U64,
    VERSION,
    _attach,
    _created_here,
    _unlink,
    _untrack,
    check_name,
    pid_alive,
    read_header,
)

logger = logging.getLogger(__name__)

MASK_FORMATS = {"mask8": (16, np.dtype(np.uint8)), "maskf32": (17, np.dtype("<f4"))}
"""pixel_format codes of mask channels and their value types."""
_BY_CODE = {code: (name, dtype) for name, (code, dtype) in MASK_FORMATS.items()}
MAX_PLANES = 32
MAX_SIDE = 4096


def parse_mask_uri(uri: str) -> tuple[str, int | None]:
    """`shm://NAME` or `shm://NAME?plane=K` → (NAME, K or None)."""
    if not uri.startswith("shm://"):
        raise TransportError(f"{uri!r}: mask channels are shm://NAME or shm://NAME?plane=K")
    name, _, query = uri.removeprefix("shm://").partition("?")
    plane: int | None = None
    if query:
        key, _, value = query.partition("=")
        if key != "plane" or not value.isdigit() or int(value) >= MAX_PLANES:
            raise TransportError(f"{uri}: the only parameter is plane=K, K in 0..{MAX_PLANES - 1}")
        plane = int(value)
    return check_name(name, uri), plane


def mask_slot_size(width: int, height: int, channels: int, itemsize: int) -> int:
    """Bytes from one slot to the next: slot header + planes, rounded up to 64."""
    return -(-(SLOT_HEADER_SIZE + width * height * channels * itemsize) // 64) * 64


class MaskChannelWriter:
    """Creates a mask channel and publishes mask frames into it (tests, Python painting tools).

    `write(planes)` takes (channels, height, width): uint8 for mask8, float in [0, 1] for maskf32.
    `close()` marks the segment closed and removes it; safe twice.
    """

    def __init__(self, name: str, width: int, height: int, *, channels: int = 1, fmt: str = "mask8") -> None:
        self.uri = f"shm://{name}"
        self.name = check_name(name, self.uri)
        if fmt not in MASK_FORMATS:
            raise TransportError(f"{self.uri}: format {fmt!r}: use one of {', '.join(MASK_FORMATS)}")
        if not (1 <= channels <= MAX_PLANES and 1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise TransportError(f"{self.uri}: 1..{MAX_PLANES} planes of at most {MAX_SIDE}×{MAX_SIDE}")
        code, self.dtype = MASK_FORMATS[fmt]
        self.width, self.height, self.channels = width, height, channels
        self.frames = 0
        self._slot_size = mask_slot_size(width, height, channels, self.dtype.itemsize)
        self._shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            name=self.name, create=True, size=HEADER_SIZE + SLOTS * self._slot_size
        )
        _created_here.add(self.name)
        HEADER.pack_into(self._shm.buf, 0, MAGIC, VERSION, HEADER_SIZE, width, height, channels, code, SLOTS,
                         self._slot_size, 0, 0, os.getpid(), STATE_LIVE)

    def write(self, planes: np.ndarray) -> int:
        """Publish one mask frame; returns its frame number."""
        shm = self._shm
        if shm is None:
            raise TransportError(f"{self.uri}: write() after close()")
        expected = (self.channels, self.height, self.width)
        if planes.shape != expected:
            raise ValueError(f"{self.uri}: planes of shape {planes.shape}; this channel takes {expected}")
        n = self.frames + 1
        offset = HEADER_SIZE + (n % SLOTS) * self._slot_size
        view = np.ndarray(expected, self.dtype, shm.buf, offset + SLOT_HEADER_SIZE)
        # Seqlock on the slot, as for frames: 0 while the planes change, n once they are whole.
        U64.pack_into(shm.buf, offset, 0)
        np.copyto(view, planes, casting="unsafe" if self.dtype.kind == "f" else "same_kind")
        del view  # a numpy view pins the buffer
        stamp = time.monotonic_ns()
        U64.pack_into(shm.buf, offset + 8, stamp)
        U64.pack_into(shm.buf, offset, n)
        U64.pack_into(shm.buf, OFF_TIMESTAMP, stamp)
        U64.pack_into(shm.buf, OFF_FRAME_COUNTER, n)
        self.frames = n
        return n

    def close(self) -> None:
        shm, self._shm = self._shm, None
        if shm is None:
            return
        U32.pack_into(shm.buf, OFF_STATE, STATE_CLOSED)
        shm.close()
        _unlink(self.name)
        _untrack(shm)
        _created_here.discard(self.name)

    def __enter__(self) -> MaskChannelWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MaskChannelReader:
    """Reads the newest whole mask frame of a channel another process writes; never blocks.

    Attaches when the segment appears, lets go when its writer closes it or dies (and attaches
    again when a writer comes back), and never creates or removes a live writer's segment.
    """

    def __init__(self, name: str) -> None:
        self.uri = f"shm://{name}"
        self.name = check_name(name, self.uri)
        self.torn = 0  # copies discarded because the writer reused the slot meanwhile
        self._shm: shared_memory.SharedMemory | None = None
        self._geometry: tuple[int, int, int] = (0, 0, 0)  # header_size, slots, slot_size
        self._shape: tuple[int, int, int] = (0, 0, 0)
        self._dtype = np.dtype(np.uint8)
        self._last = 0
        self._next_check = 0.0
        self._waiting_logged = False

    def _attach(self) -> bool:
        try:
            shm = _attach(self.name)
        except FileNotFoundError:
            if not self._waiting_logged:
                logger.info("%s: waiting for a writer to create the mask channel", self.uri)
                self._waiting_logged = True
            return False
        try:
            header = read_header(shm)
            fmt = _BY_CODE.get(header.pixel_format)
            if header.magic != MAGIC or header.version != VERSION or fmt is None:
                what = _FORMAT_NAMES.get(header.pixel_format, header.pixel_format)
                raise TransportError(
                    f"{self.uri}: not a version-{VERSION} mask channel (pixel_format {what}; masks are 16 = mask8 "
                    "or 17 = maskf32, docs/shm-format.md)"
                )
            dtype = fmt[1]
            needed = mask_slot_size(header.width, header.height, header.channels, dtype.itemsize)
            if (not 1 <= header.channels <= MAX_PLANES or not 1 <= header.width <= MAX_SIDE
                    or not 1 <= header.height <= MAX_SIDE or header.slot_count < 2 or header.slot_size < needed
                    or shm.size < header.header_size + header.slot_count * header.slot_size):
                raise TransportError(f"{self.uri}: the header of {self.name!r} is inconsistent: {header}")
        except BaseException:
            shm.close()
            raise
        self._shm = shm
        self._geometry = (header.header_size, header.slot_count, header.slot_size)
        self._shape = (header.channels, header.height, header.width)
        self._dtype = dtype
        self._last = 0
        self._waiting_logged = False
        logger.info("%s: reading %d %s mask plane(s) of %dx%d (writer pid %d)", self.uri, header.channels,
                    fmt[0], header.width, header.height, header.writer_pid)
        return True

    def poll(self) -> np.ndarray | None:
        """The newest mask frame not returned yet, (channels, H, W) float32 in [0, 1] (a new array), or None."""
        if self._shm is None and not self._attach():
            return None
        shm = self._shm
        assert shm is not None
        hsize, slots, size = self._geometry
        for _ in range(slots + 1):
            n = U64.unpack_from(shm.buf, OFF_FRAME_COUNTER)[0]
            if n == 0 or n == self._last:
                break
            offset = hsize + (n % slots) * size
            if U64.unpack_from(shm.buf, offset)[0] != n:
                continue  # the writer moved on to this slot: read the counter again
            view = np.ndarray(self._shape, self._dtype, shm.buf, offset + SLOT_HEADER_SIZE)
            planes = view.astype(np.float32)
            del view
            if U64.unpack_from(shm.buf, offset)[0] != n:
                self.torn += 1
                continue
            self._last = n
            if self._dtype == np.uint8:
                planes /= 255.0
            return planes
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 1.0
            self._check_writer()
        return None

    def _check_writer(self) -> None:
        """Nothing new: let go of a closed or orphaned segment so a returning writer is found."""
        shm = self._shm
        assert shm is not None
        state, pid = U32.unpack_from(shm.buf, OFF_STATE)[0], U32.unpack_from(shm.buf, OFF_PID)[0]
        if state != STATE_CLOSED and pid_alive(pid):
            return
        logger.warning("%s: the mask writer %s; waiting for it to come back", self.uri,
                       "closed the channel" if state == STATE_CLOSED else f"(pid {pid}) died")
        self.close()

    def close(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            shm.close()


class MaskChannels:
    """Which brush reads which plane of which channel, and which brush masks changed.

    `bind(brush, uri)` attaches brush `brush` to plane K of the channel (K from ?plane=K, else
    the brush number); `poll()` returns (brush, (H, W) float32 mask) for every bound brush
    whose plane changed since it last got one (or that was bound since). Engine thread only.
    """

    def __init__(self) -> None:
        self._readers: dict[str, MaskChannelReader] = {}
        self._latest: dict[str, np.ndarray] = {}  # name → the last planes read
        self._bound: dict[int, tuple[str, int]] = {}  # brush → (channel name, plane)
        self._uris: dict[int, str] = {}  # brush → the URI it was bound with
        self._given: dict[int, np.ndarray] = {}  # brush → the plane it was last given
        self._warned: set[tuple[str, int]] = set()

    def __bool__(self) -> bool:
        return bool(self._bound)

    def bind(self, brush: int, uri: str) -> None:
        name, plane = parse_mask_uri(uri)
        self._bound[brush] = (name, brush if plane is None else plane)
        self._uris[brush] = uri
        self._given.pop(brush, None)
        if name not in self._readers:
            self._readers[name] = MaskChannelReader(name)

    def unbind(self, brush: int) -> None:
        if self._bound.pop(brush, None) is None:
            return
        self._uris.pop(brush, None)
        self._given.pop(brush, None)
        for name in set(self._readers) - {n for n, _ in self._bound.values()}:
            self._readers.pop(name).close()
            self._latest.pop(name, None)

    def bindings(self) -> dict[int, str]:
        """brush → the shm:// URI it reads its mask from."""
        return dict(self._uris)

    def poll(self) -> list[tuple[int, np.ndarray]]:
        for name, reader in self._readers.items():
            planes = reader.poll()
            if planes is not None:
                self._latest[name] = planes
        changed = []
        for brush, (name, plane) in self._bound.items():
            planes = self._latest.get(name)
            if planes is None:
                continue
            if plane >= planes.shape[0]:
                if (name, plane) not in self._warned:
                    self._warned.add((name, plane))
                    logger.warning("shm://%s has %d mask plane(s); brush %d reads plane %d", name, planes.shape[0],
                                   brush, plane)
                continue
            mask = planes[plane]
            given = self._given.get(brush)
            if given is None or given.shape != mask.shape or not np.array_equal(given, mask):
                self._given[brush] = mask
                changed.append((brush, mask))
        return changed

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._latest.clear()
        self._given.clear()
