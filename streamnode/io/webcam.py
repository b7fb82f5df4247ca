"""webcam:// — capture devices through OpenCV: webcams, capture cards, the OBS Virtual Camera.

    webcam://0                           the first device
    webcam://0?size=1280x720&fps=60      ask the device for a mode (it may pick the nearest)
    webcam://OBS Virtual Camera          by name (Linux: the V4L2 card name; elsewhere use the index
                                         that `streamnode sources` shows)
    webcam:///dev/video2                 by device node (Linux)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from streamnode.io.base import SourceLost, Transport, TransportError, TransportOptions, UriParams

logger = logging.getLogger(__name__)


def _capture_api() -> int:
    # The backend that opens virtual cameras and capture cards fastest on each system.
    if sys.platform == "win32":
        return cv2.CAP_DSHOW
    if sys.platform == "darwin":
        return cv2.CAP_AVFOUNDATION
    return cv2.CAP_V4L2


def _linux_devices() -> list[tuple[int, str]]:
    """(index, card name) of V4L2 capture nodes, from sysfs: no device is opened."""
    found = []
    for node in sorted(Path("/sys/class/video4linux").glob("video*"), key=lambda p: int(p.name[5:] or 0)):
        try:
            # A camera exposes a capture node (index 0) and a metadata node (index 1).
            if (node / "index").read_text().strip() not in ("", "0"):
                continue
            name = (node / "name").read_text().strip()
        except OSError:
            continue
        found.append((int(node.name[5:]), name))
    return found


def list_devices(probe: int = 6) -> list[tuple[str, str]]:
    """(uri, description) of the capture devices this machine has.

    On Linux from sysfs; elsewhere by opening indices 0..probe-1, which takes a moment per device.
    """
    if sys.platform.startswith("linux"):
        return [(f"webcam://{i}", f"{name} (/dev/video{i})") for i, name in _linux_devices()]
    found = []
    for index in range(probe):
        cap = cv2.VideoCapture(index, _capture_api())
        try:
            if cap.isOpened():
                w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
                found.append((f"webcam://{index}", f"device {index} ({w}x{h})"))
        finally:
            cap.release()
    return found


def resolve_device(target: str) -> int | str:
    """An index, a device node, or (Linux) a card name → what `cv2.VideoCapture` takes."""
    if target.isdigit():
        return int(target)
    if target.startswith("/dev/"):
        return target
    if sys.platform.startswith("linux"):
        devices = _linux_devices()
        for index, name in devices:
            if name.casefold() == target.casefold():
                return index
        for index, name in devices:
            if target.casefold() in name.casefold():
                return index
        names = ", ".join(f"{name!r}" for _, name in devices) or "none"
        raise TransportError(f"webcam://{target}: no capture device by that name; devices: {names}")
    raise TransportError(
        f"webcam://{target}: on this system open devices by index, e.g. webcam://0; "
        "`streamnode sources` lists them"
    )


class WebcamSource(Transport):
    """One OpenCV capture device."""

    def __init__(self, device: int | str = 0, *, size: tuple[int, int] | None = None,
                 fps: float | None = None, uri: str = "") -> None:
        self.device = device
        self.uri = uri or f"webcam://{device}"
        self.size = size
        self.fps = fps
        self._cap: cv2.VideoCapture | None = None
        self._bgr: np.ndarray | None = None
        self._rgb: np.ndarray | None = None

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> WebcamSource:
        size = params.size("size", (0, 0))
        fps = params.number("fps", None, minimum=0.001)
        params.done()
        return cls(resolve_device(target or "0"), size=size if size != (0, 0) else None, fps=fps, uri=uri)

    def open(self) -> None:
        self.close()
        if isinstance(self.device, str) and not os.path.exists(self.device):
            raise TransportError(f"{self.uri}: {self.device} does not exist")
        cap = cv2.VideoCapture(self.device, _capture_api())
        if not cap.isOpened():
            cap.release()
            raise TransportError(f"{self.uri}: cannot open capture device {self.device} (in use, or not there)")
        # One buffered frame: the node wants the newest picture, not a queue of old ones.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self.size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        self._cap = cap
        logger.info(
            "%s: %dx%d at %.3g fps", self.uri, cap.get(cv2.CAP_PROP_FRAME_WIDTH),
            cap.get(cv2.CAP_PROP_FRAME_HEIGHT), cap.get(cv2.CAP_PROP_FPS),
        )

    def read(self, timeout: float) -> np.ndarray | None:
        # cv2 has no read timeout; a live device delivers within one frame interval anyway.
        assert self._cap is not None, "read() before open()"
        ok, frame = self._cap.read(self._bgr)
        if not ok or frame is None:
            raise SourceLost(f"{self.uri}: the device stopped delivering frames")
        self._bgr = frame
        if self._rgb is None or self._rgb.shape != frame.shape:
            self._rgb = np.empty(frame.shape, np.uint8)
        cv2.cvtColor(frame, cv2.COLOR_BGR2RGB, dst=self._rgb)
        return self._rgb

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
