"""End to end through the real Node: OSC over UDP → the node's queue → the tiny StreamEngine →
the frames a sink receives, plus state, pause, status and the applied echo."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
from pythonosc.osc_message_builder import OscMessageBuilder
from support import wait_osc

from streamnode.config import build_config
from streamnode.frames import Frame

node_module = pytest.importorskip("streamnode.node")
base = pytest.importorskip("streamnode.io.base")


class CaptureSink(base.Transport):
    """Keeps a copy of every frame it is sent (a test sink registered as osctest://)."""

    instances: list[CaptureSink] = []

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.frames: list[np.ndarray] = []
        self.lock = threading.Lock()
        CaptureSink.instances.append(self)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: Any, options: Any) -> CaptureSink:
        return cls(uri)

    def open(self) -> None:
        pass

    def send(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame.image.copy())

    def close(self) -> None:
        pass

    def count(self) -> int:
        with self.lock:
            return len(self.frames)

    def last(self) -> np.ndarray:
        with self.lock:
            return self.frames[-1]


class Surface:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.node_port = 0

    def send(self, address: str, *args: Any) -> None:
        builder = OscMessageBuilder(address)
        for a in args:
            builder.add_arg(a)
        self.sock.sendto(builder.build().dgram, ("127.0.0.1", self.node_port))

    def wait_for(self, address: str, params: list[Any] | None = None, timeout: float = 10.0) -> list[Any]:
        msg = wait_osc(self.sock, lambda m: m.address == address and (params is None or m.params == params), timeout)
        assert msg is not None, f"no {address} {params or ''} within {timeout} s"
        return msg.params


def wait_until(predicate: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def running_node(tiny_model_path):
    base.register_sink("osctest", CaptureSink)
    CaptureSink.instances.clear()
    surface = Surface()
    config = build_config({
        "model": {"id": "tiny", "device": "cpu", "accel": "eager"},
        "stream": {"width": 64, "height": 64, "t_index_list": [35], "cfg_type": "none", "prompt": "a dog",
                   "similarity_threshold": 0.0, "prompt_transition_frames": 0},
        "source": {"uri": "test://bars", "fps": 15},  # a still picture: outputs only change with the prompt
        "sinks": ["osctest://"],
        "osc": {"port": 0, "reply_port": surface.port},
    })
    node = node_module.Node(config)
    node.start()
    try:
        surface.node_port = node.osc_port
        sink = CaptureSink.instances[-1]
        wait_until(lambda: node.status()["state"] == "streaming" and sink.count() >= 3, what="streaming")
        yield node, surface, sink
    finally:
        node.stop()
        surface.sock.close()


def test_osc_drives_the_running_node(running_node) -> None:
    node, surface, sink = running_node
    before = sink.last()

    surface.send("/prompt", "a cat")
    assert surface.wait_for("/streamnode/applied/prompt") == ["a cat"]
    n = sink.count()
    wait_until(lambda: sink.count() >= n + 2, 30, "frames after the prompt change")
    assert node.status()["params"]["prompt"] == "a cat"
    assert np.abs(sink.last().astype(int) - before).mean() > 0  # the new prompt reached the output

    surface.send("/guidance", 2.5)
    assert surface.wait_for("/streamnode/applied/guidance") == [2.5]
    assert node._engine.params.guidance_scale == 2.5

    surface.send("/pause", 1)
    assert surface.wait_for("/streamnode/state", ["paused"])
    surface.send("/pause", 0)
    assert surface.wait_for("/streamnode/state", ["streaming"])

    surface.send("/status")
    assert surface.wait_for("/streamnode/applied/prompt") == ["a cat"]

    surface.send("/guidance", 99.0)
    assert surface.wait_for("/streamnode/error") == ["/guidance: 99.0 is out of range 0..20"]
    assert node.status()["state"] == "streaming"
