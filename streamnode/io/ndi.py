"""ndi:// — NDI in and out (ndi-python, which bundles the NDI runtime).

    --source "ndi://Studio A"             a sender named "Studio A" on any machine
    --source "ndi://STAGE-PC (Studio A)"  the full NDI name, machine included
    --sink ndi://streamnode               publish the output as "<this machine> (streamnode)"
    --ndi-discovery 10.0.0.5,127.0.0.1    extra addresses to look for senders (no mDNS)

The source waits for its sender to appear, follows it when it vanishes and comes back, and
asks NDI for UYVY (its native format; converted here) unless ?color=bgrx or rgbx. NDI video is
lossy: pixel values come back close to, not equal to, what was sent.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType

import cv2
import numpy as np

from streamnode.frames import Frame
from streamnode.io.base import Transport, TransportError, TransportOptions, UriParams, require

logger = logging.getLogger(__name__)

# A sender that delivered nothing for this long, with no connection left, is gone.
VANISHED_AFTER_S = 1.0
# How often a missing sender is looked up again.
LOOKUP_INTERVAL_S = 0.25
# While a sender stays missing, a fresh finder this often. Unicast discovery (--ndi-discovery)
# reaches one NDI process per connection: every NDI program on a host listens on the same
# port (5960, SO_REUSEPORT), so one finder sees the senders of whichever process answered.
FINDER_REFRESH_S = 1.5

_runtime_lock = threading.Lock()
_runtime_users = 0


def _lib() -> ModuleType:
    return require("NDIlib", "ndi-python", "ndi", "ndi://")


def _acquire_runtime() -> ModuleType:
    """NDIlib.initialize() once per process, shared by every NDI source, sink and finder."""
    global _runtime_users
    ndi = _lib()
    with _runtime_lock:
        if _runtime_users == 0 and not ndi.initialize():
            raise TransportError("ndi://: the NDI runtime does not start on this CPU (it needs SSE4.2)")
        _runtime_users += 1
    return ndi


def _release_runtime() -> None:
    global _runtime_users
    ndi = _lib()
    with _runtime_lock:
        _runtime_users -= 1
        if _runtime_users == 0:
            ndi.destroy()


def name_matches(full_name: str, wanted: str) -> bool:
    """NDI names read "MACHINE (sender)"; "sender" alone matches any machine."""
    if full_name.casefold() == wanted.casefold():
        return True
    _, sep, rest = full_name.partition(" (")
    return bool(sep) and rest.endswith(")") and rest[:-1].casefold() == wanted.casefold()


class _Finder:
    def __init__(self, ndi: ModuleType, discovery: tuple[str, ...]) -> None:
        settings = ndi.FindCreate()
        settings.show_local_sources = True
        if discovery:
            settings.extra_ips = ",".join(discovery)
        self._ndi = ndi
        self._finder = ndi.find_create_v2(settings)
        if self._finder is None:
            raise TransportError("ndi://: cannot create an NDI finder")

    def sources(self, wait_ms: int = 0) -> list:
        if wait_ms:
            self._ndi.find_wait_for_sources(self._finder, wait_ms)
        return list(self._ndi.find_get_current_sources(self._finder))

    def close(self) -> None:
        if self._finder is not None:
            self._ndi.find_destroy(self._finder)
            self._finder = None


def list_sources(discovery: tuple[str, ...] = (), wait_s: float = 2.0) -> list[str]:
    """Names of the NDI senders seen within `wait_s` seconds."""
    ndi = _acquire_runtime()
    names: set[str] = set()
    try:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            # Several short-lived finders: each may reach a different NDI process (see FINDER_REFRESH_S).
            finder = _Finder(ndi, discovery)
            try:
                names.update(s.ndi_name for s in finder.sources(wait_ms=int(min(left, 0.5) * 1000)))
            finally:
                finder.close()
        return sorted(names)
    finally:
        _release_runtime()


_COLOR_FORMATS = {"uyvy": "RECV_COLOR_FORMAT_UYVY_BGRA", "bgrx": "RECV_COLOR_FORMAT_BGRX_BGRA",
                  "rgbx": "RECV_COLOR_FORMAT_RGBX_RGBA"}


class NdiSource(Transport):
    """Receives one NDI sender by name. `read()` returns None while the sender is away."""

    def __init__(self, name: str, *, discovery: tuple[str, ...] = (), color: str = "uyvy",
                 bandwidth: str = "highest", uri: str = "") -> None:
        if not name:
            raise TransportError("ndi://: name the sender, e.g. ndi://Studio A (`streamnode sources` lists them)")
        _lib()  # a missing package is a startup error, not a retry loop
        self.name = name
        self.uri = uri or f"ndi://{name}"
        self.discovery = discovery
        self.color = color
        self.bandwidth = bandwidth
        self.fps = None
        self._ndi: ModuleType | None = None
        self._finder: _Finder | None = None
        self._recv = None
        self._connected_to = ""
        self._next_lookup = 0.0
        self._finder_since = 0.0
        self._last_video = 0.0
        self._waiting_logged = False
        self._rgb: np.ndarray | None = None

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> NdiSource:
        color = params.text("color", "uyvy", choices=tuple(_COLOR_FORMATS))
        bandwidth = params.text("bandwidth", "highest", choices=("highest", "lowest"))
        extra = params.text("discovery")
        params.done()
        discovery = options.ndi_discovery + tuple(s.strip() for s in (extra or "").split(",") if s.strip())
        return cls(target, discovery=discovery, color=color, bandwidth=bandwidth, uri=uri)

    @property
    def connected(self) -> bool:
        return bool(self._connected_to)

    def open(self) -> None:
        self.close()
        ndi = self._ndi = _acquire_runtime()
        try:
            self._finder = _Finder(ndi, self.discovery)
            self._finder_since = time.monotonic()
            settings = ndi.RecvCreateV3()
            settings.color_format = getattr(ndi, _COLOR_FORMATS[self.color])
            settings.bandwidth = ndi.RECV_BANDWIDTH_HIGHEST if self.bandwidth == "highest" else ndi.RECV_BANDWIDTH_LOWEST
            settings.ndi_recv_name = "streamnode"
            self._recv = ndi.recv_create_v3(settings)
            if self._recv is None:
                raise TransportError(f"{self.uri}: cannot create an NDI receiver")
        except BaseException:
            self.close()
            raise
        self._connected_to = ""
        self._next_lookup = 0.0
        self._waiting_logged = False

    def _lookup(self) -> bool:
        """Connect to the sender if the finder sees it now."""
        assert self._ndi is not None and self._finder is not None
        now = time.monotonic()
        self._next_lookup = now + LOOKUP_INTERVAL_S
        if now - self._finder_since > FINDER_REFRESH_S:
            self._finder.close()
            self._finder = _Finder(self._ndi, self.discovery)
            self._finder_since = now
        for source in self._finder.sources():
            if name_matches(source.ndi_name, self.name):
                self._ndi.recv_connect(self._recv, source)
                self._connected_to = source.ndi_name
                self._last_video = time.monotonic()
                self._waiting_logged = False
                logger.info("%s: receiving %r (%s)", self.uri, source.ndi_name, source.url_address or "?")
                return True
        if not self._waiting_logged:
            where = f" (discovery: {', '.join(self.discovery)})" if self.discovery else ""
            logger.warning("%s: waiting for an NDI sender named %r%s", self.uri, self.name, where)
            self._waiting_logged = True
        return False

    def read(self, timeout: float) -> np.ndarray | None:
        ndi = self._ndi
        assert ndi is not None and self._recv is not None, "read() before open()"
        if not self._connected_to and (time.monotonic() < self._next_lookup or not self._lookup()):
            time.sleep(min(timeout, LOOKUP_INTERVAL_S))
            return None
        kind, video, _, _ = ndi.recv_capture_v2(self._recv, int(timeout * 1000), want_audio=False, want_metadata=False)
        if kind == ndi.FRAME_TYPE_VIDEO:
            try:
                self._convert(ndi, video)
            finally:
                ndi.recv_free_video_v2(self._recv, video)
            self._last_video = time.monotonic()
            return self._rgb
        if kind == ndi.FRAME_TYPE_NONE and time.monotonic() - self._last_video > VANISHED_AFTER_S \
                and ndi.recv_get_no_connections(self._recv) == 0:
            logger.warning("%s: sender %r vanished; waiting for it to come back", self.uri, self._connected_to)
            # Look it up again: a sender that restarts may come back on another port.
            ndi.recv_connect(self._recv, None)
            self._connected_to = ""
            self._waiting_logged = True
        return None

    def _convert(self, ndi: ModuleType, video) -> None:
        data = video.data
        h, w = video.yres, video.xres
        if self._rgb is None or self._rgb.shape != (h, w, 3):
            self._rgb = np.empty((h, w, 3), np.uint8)
            if video.frame_rate_D:
                self.fps = video.frame_rate_N / video.frame_rate_D
        fourcc = video.FourCC
        if fourcc == ndi.FOURCC_VIDEO_TYPE_UYVY:
            cv2.cvtColor(data[:, :w], cv2.COLOR_YUV2RGB_UYVY, dst=self._rgb)
        elif fourcc in (ndi.FOURCC_VIDEO_TYPE_BGRX, ndi.FOURCC_VIDEO_TYPE_BGRA):
            cv2.cvtColor(data[:, :w], cv2.COLOR_BGRA2RGB, dst=self._rgb)
        elif fourcc in (ndi.FOURCC_VIDEO_TYPE_RGBX, ndi.FOURCC_VIDEO_TYPE_RGBA):
            cv2.cvtColor(data[:, :w], cv2.COLOR_RGBA2RGB, dst=self._rgb)
        else:
            raise TransportError(f"{self.uri}: NDI delivered {fourcc}, which this receiver does not convert")

    def close(self) -> None:
        if self._ndi is None:
            return
        if self._recv is not None:
            self._ndi.recv_destroy(self._recv)
            self._recv = None
        if self._finder is not None:
            self._finder.close()
            self._finder = None
        self._connected_to = ""
        self._ndi = None
        _release_runtime()


class NdiSink(Transport):
    """Publishes the output as an NDI sender (RGBX, progressive, at the node's nominal rate)."""

    def __init__(self, name: str, width: int, height: int, fps: float = 30.0, *, uri: str = "") -> None:
        if not name:
            raise TransportError("ndi://: name the sender to publish, e.g. --sink ndi://streamnode")
        _lib()
        self.name = name
        self.uri = uri or f"ndi://{name}"
        self.width, self.height = width, height
        self.fps_out = fps
        self._ndi: ModuleType | None = None
        self._send = None
        self._video = None
        self._rgbx = np.full((height, width, 4), 255, np.uint8)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> NdiSink:
        fps = params.number("fps", options.fps, minimum=0.001)
        params.done()
        return cls(target, options.width, options.height, fps, uri=uri)

    def open(self) -> None:
        self.close()
        ndi = self._ndi = _acquire_runtime()
        settings = ndi.SendCreate()
        settings.ndi_name = self.name
        # The engine is the clock; NDI must not add its own pacing (it would block the sink).
        settings.clock_video = False
        settings.clock_audio = False
        self._send = ndi.send_create(settings)
        if self._send is None:
            self.close()
            raise TransportError(f"{self.uri}: cannot create an NDI sender named {self.name!r}")
        video = ndi.VideoFrameV2()
        video.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
        video.frame_rate_N, video.frame_rate_D = round(self.fps_out * 1000), 1000
        video.frame_format_type = ndi.FRAME_FORMAT_TYPE_PROGRESSIVE
        video.data = self._rgbx
        self._video = video
        logger.info("%s: publishing NDI sender %r", self.uri, self.name)

    def send(self, frame: Frame) -> None:
        ndi = self._ndi
        assert ndi is not None and self._send is not None, "send() before open()"
        image = frame.image
        if image.shape[:2] != self._rgbx.shape[:2]:
            self._rgbx = np.full((*image.shape[:2], 4), 255, np.uint8)
        cv2.cvtColor(image, cv2.COLOR_RGB2RGBA, dst=self._rgbx)  # X = 255
        self._video.data = self._rgbx
        ndi.send_send_video_v2(self._send, self._video)

    def connections(self, timeout_ms: int = 0) -> int:
        """How many receivers are connected now."""
        if self._ndi is None or self._send is None:
            return 0
        return self._ndi.send_get_no_connections(self._send, timeout_ms)

    def close(self) -> None:
        if self._ndi is None:
            return
        if self._send is not None:
            self._ndi.send_destroy(self._send)
            self._send = None
        self._video = None
        self._ndi = None
        _release_runtime()
