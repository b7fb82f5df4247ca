"""null:// — a sink that discards every frame (benchmarks, headless runs that only need metrics)."""

from __future__ import annotations

from streamnode.frames import Frame
from streamnode.io.base import Transport, TransportOptions, UriParams


class NullSink(Transport):
    """Counts frames and drops them."""

    def __init__(self, uri: str = "null://") -> None:
        self.uri = uri
        self.frames = 0

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> NullSink:
        params.done()
        return cls(uri)

    def open(self) -> None:
        self.frames = 0

    def send(self, frame: Frame) -> None:
        self.frames += 1

    def close(self) -> None:
        pass
