"""vcam:// — a virtual camera through pyvirtualcam, for OBS, Zoom, browsers, TouchDesigner's Video Device In.

    --sink vcam://                       the first backend that works on this system
    --sink "vcam://OBS Virtual Camera"   a named device (Linux: /dev/videoN)
    --sink vcam://?backend=unitycapture  a given backend (obs, unitycapture, v4l2loopback)
    --sink vcam://?fps=60                the camera's frame rate (default: the node's)

Backends: OBS Virtual Camera or Unity Capture on Windows, OBS on macOS, v4l2loopback on Linux.
A virtual camera expects a steady clock, so the node feeds this sink at `fps` from its own
thread, repeating the last frame when the engine is slower; the engine never waits for it.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

from streamnode.frames import Frame
from streamnode.io.base import Transport, TransportOptions, TransportUnavailable, UriParams, require

logger = logging.getLogger(__name__)


def install_hint() -> str:
    """What to install for a virtual camera on this system."""
    if sys.platform == "win32":
        return ("install OBS Studio 28+ and start its Virtual Camera once (Tools → Start Virtual Camera), "
                "or install Unity Capture")
    if sys.platform == "darwin":
        return ("install OBS Studio 30+ and start its Virtual Camera once, "
                "allowing the camera system extension when macOS asks")
    return ("install v4l2loopback and load it: sudo modprobe v4l2loopback exclusive_caps=1 card_label=streamnode "
            "(Debian/Ubuntu: sudo apt install v4l2loopback-dkms)")


def _lib() -> ModuleType:
    return require("pyvirtualcam", "pyvirtualcam", "vcam", "vcam://")


class VcamSink(Transport):
    """One pyvirtualcam camera, RGB in."""

    def __init__(self, width: int, height: int, fps: float = 30.0, *, device: str | None = None,
                 backend: str | None = None, uri: str = "") -> None:
        self._pyvirtualcam = _lib()
        if backend is not None and backend not in self._pyvirtualcam.camera.BACKENDS:
            known = ", ".join(sorted(self._pyvirtualcam.camera.BACKENDS)) or "none on this system"
            raise TransportUnavailable(f"vcam://: no backend {backend!r} (backends here: {known}); {install_hint()}")
        self.uri = uri or "vcam://"
        self.width, self.height = width, height
        self.pace_fps = fps
        self.device = device
        self.backend = backend
        self._camera = None

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> VcamSink:
        fps = params.number("fps", options.fps, minimum=1.0)
        backend = params.text("backend")
        params.done()
        return cls(options.width, options.height, fps, device=target or None, backend=backend, uri=uri)

    def open(self) -> None:
        self.close()
        try:
            camera = self._pyvirtualcam.Camera(
                self.width, self.height, self.pace_fps, fmt=self._pyvirtualcam.PixelFormat.RGB,
                device=self.device, backend=self.backend,
            )
        except RuntimeError as e:
            # pyvirtualcam collects one line per backend it tried; keep them, add the fix.
            tried = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise TransportUnavailable(f"vcam://: no virtual camera could be opened ({tried}). To fix: {install_hint()}") from None
        self._camera = camera
        logger.info("%s: %s on %s, %dx%d at %.3g fps", self.uri, camera.backend, camera.device,
                    self.width, self.height, self.pace_fps)

    def send(self, frame: Frame) -> None:
        assert self._camera is not None, "send() before open()"
        self._camera.send(frame.image)

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.close()
