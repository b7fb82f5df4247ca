"""spout:// — Spout texture sharing on Windows (TouchDesigner, Resolume, OBS Spout2 plugin), via SpoutGL.

    --source "spout://TDSyphonSpoutOut"   receive a sender by name (empty name: the active sender)
    --sink spout://streamnode             publish the output as a Spout sender

Spout exists only on Windows. Elsewhere these URIs fail at startup with the alternatives
(ndi://, shm://). SpoutGL creates its own hidden OpenGL context; frames cross the CPU here
(receiveImage/sendImage), which costs a copy but needs no GL code in the node.
"""

from __future__ import annotations

import logging
import sys
import time
from types import ModuleType

import numpy as np

from streamnode.frames import Frame
from streamnode.io.base import (
    SourceLost,
    Transport,
    TransportError,
    TransportOptions,
    TransportUnavailable,
    UriParams,
    require,
)

logger = logging.getLogger(__name__)


def _lib() -> ModuleType:
    if sys.platform != "win32":
        raise TransportUnavailable(
            "spout:// works on Windows only (Spout shares DirectX textures); "
            "on this system use ndi:// or shm:// to exchange video with other programs"
        )
    return require("SpoutGL", "SpoutGL", "spout", "spout://")


def list_senders() -> list[str]:
    """Names of the Spout senders running now (Windows; empty elsewhere)."""
    if sys.platform != "win32":
        return []
    spout = _lib()
    receiver = spout.SpoutReceiver()
    try:
        # getSenderList appeared in later SpoutGL releases.
        return sorted(receiver.getSenderList()) if hasattr(receiver, "getSenderList") else []
    finally:
        receiver.releaseReceiver()


class SpoutSource(Transport):
    """Receives one Spout sender as RGB."""

    def __init__(self, name: str = "", *, uri: str = "") -> None:
        self._spout = _lib()
        self.name = name
        self.uri = uri or f"spout://{name}"
        self.fps = None
        self._receiver = None
        self._rgb = np.zeros((0, 0, 3), np.uint8)
        self._last_frame = 0.0

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> SpoutSource:
        params.done()
        return cls(target, uri=uri)

    def open(self) -> None:
        self.close()
        self._receiver = self._spout.SpoutReceiver()
        if self.name:
            self._receiver.setReceiverName(self.name)
        self._last_frame = time.monotonic()

    def read(self, timeout: float) -> np.ndarray | None:
        receiver = self._receiver
        assert receiver is not None, "read() before open()"
        if self.name:
            receiver.waitFrameSync(self.name, int(timeout * 1000))
        buffer = self._rgb if self._rgb.size else None
        ok = receiver.receiveImage(buffer, self._spout.enums.GL_RGB, False, 0)
        if receiver.isUpdated():
            # The sender appeared or changed size: the next receive fills a buffer of that size.
            w, h = receiver.getSenderWidth(), receiver.getSenderHeight()
            self._rgb = np.zeros((h, w, 3), np.uint8)
            return None
        if ok and self._rgb.size and receiver.isFrameNew():
            self._last_frame = time.monotonic()
            return self._rgb
        if not receiver.isConnected() and time.monotonic() - self._last_frame > 1.0:
            raise SourceLost(f"{self.uri}: no Spout sender {self.name or '(active)'}")
        if not self.name:
            time.sleep(min(timeout, 0.005))
        return None

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.releaseReceiver()
            self._receiver = None


class SpoutSink(Transport):
    """Publishes the output as a Spout sender."""

    def __init__(self, name: str, *, uri: str = "") -> None:
        if not name:
            raise TransportError("spout://: name the sender to publish, e.g. --sink spout://streamnode")
        self._spout = _lib()
        self.name = name
        self.uri = uri or f"spout://{name}"
        self._sender = None

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> SpoutSink:
        params.done()
        return cls(target, uri=uri)

    def open(self) -> None:
        self.close()
        self._sender = self._spout.SpoutSender()
        self._sender.setSenderName(self.name)
        logger.info("%s: publishing Spout sender %r", self.uri, self.name)

    def send(self, frame: Frame) -> None:
        assert self._sender is not None, "send() before open()"
        h, w = frame.image.shape[:2]
        if not self._sender.sendImage(frame.image, w, h, self._spout.enums.GL_RGB, False, 0):
            raise OSError(f"{self.uri}: Spout did not take the frame")
        self._sender.setFrameSync(self.name)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.releaseSender()
            self._sender = None
