"""What several test files share: waiting for a condition, a free loopback port, loading a
kit script (TouchDesigner, OBS) by path the way its host application would."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pythonosc.osc_message import OscMessage


def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str = "", step: float = 0.01) -> Any:
    """Poll `check` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what or check}")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_osc(sock: socket.socket, accept: Callable[[OscMessage], bool], timeout: float) -> OscMessage | None:
    """Read OSC messages arriving on `sock` until `accept` takes one; None after `timeout` s."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            continue
        msg = OscMessage(data)
        if accept(msg):
            return msg
    return None


def load_script(path: Path, name: str) -> types.ModuleType:
    """Import a kit script from its file, with its folder importable (its siblings), as a module
    registered under `name` (dataclasses look their module up in sys.modules)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- a real node on the tiny model, and an OSC surface on loopback ---------------------------

SMALL = 64


def small_config(**overrides: Any):  # noqa: ANN201 - NodeConfig, imported lazily
    """A node at 64×64 on a 30 fps test pattern: the tiny model, one step, cfg none, no
    similarity filter and no prompt transition (a change shows on the very next frame)."""
    from streamnode.config import load_config

    values: dict[str, Any] = {
        "source.uri": "test://moving?fps=30", "sinks": ["null://"], "stream.width": SMALL, "stream.height": SMALL,
        "stream.t_index_list": [35], "stream.cfg_type": "none", "stream.similarity_threshold": 0.0,
        "stream.prompt_transition_frames": 0, "osc.enabled": False, "runtime.metrics_interval_s": 60.0,
        # PyTorch as is: `auto` would compile OpenVINO models first (tests/test_accel_openvino.py
        # covers that); a test about the node should not wait for a compiler.
        "model.accel": "eager",
    }
    values.update(overrides)
    return load_config(overrides=values)


def tiny_factory(components: Any) -> Callable[[Any], Any]:
    """The node's own engine builder: for `--model tiny` on the already loaded tiny components
    (no reload per test), for any other model (a switch) a real load."""
    from streamnode.node import build_engine

    return lambda config: build_engine(config, components=components if config.model.id == "tiny" else None)


def message(address: str, *args: Any, types: str | None = None) -> bytes:
    from pythonosc.osc_message_builder import OscMessageBuilder

    builder = OscMessageBuilder(address=address)
    for i, value in enumerate(args):
        builder.add_arg(value, types[i] if types else None)
    return builder.build().dgram


class Surface:
    """A control surface on loopback: sends from the port the node replies to."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.node: tuple[str, int] | None = None
        self.inbox: list[tuple[str, list[Any]]] = []

    def send(self, address: str, *args: Any, types: str | None = None) -> None:
        self.send_raw(message(address, *args, types=types))

    def send_raw(self, data: bytes) -> None:
        assert self.node is not None
        self.sock.sendto(data, self.node)

    def collect(self, seconds: float) -> list[tuple[str, list[Any]]]:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._recv(left)
        return self.inbox

    def _recv(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, _ = self.sock.recvfrom(65536)
        except TimeoutError:
            return
        msg = OscMessage(data)
        self.inbox.append((msg.address, msg.params))

    def wait_for(self, address: str, timeout: float = 5.0, where: Any = None) -> list[Any]:
        """Params of the first reply at `address` (consumed from the inbox)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (addr, params) in enumerate(self.inbox):
                if addr == address and (where is None or where(params)):
                    del self.inbox[i]
                    return params
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {address} within {timeout} s; got {self.inbox[-10:]}")
            self._recv(min(left, 0.05))

    def errors(self, seconds: float = 0.3) -> list[str]:
        self.collect(seconds)
        found = [p[0] for a, p in self.inbox if a.endswith("/streamnode/error") and p and p[0]]
        self.inbox = [(a, p) for a, p in self.inbox if not a.endswith("/streamnode/error")]
        return found

    def close(self) -> None:
        self.sock.close()


def applied_addr(address: str, prefix: str = "") -> str:
    return f"{prefix}/streamnode/applied{address}"


class Clock:
    """A sink that keeps when each frame arrived (registered as clock:// by `clock_sinks()`)."""

    instances: list[Clock] = []

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.pace_fps = None
        self.times: list[float] = []
        Clock.instances.append(self)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: Any, options: Any) -> Clock:
        return cls(uri)

    def open(self) -> None:
        pass

    def send(self, frame: Any) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass


@contextlib.contextmanager
def clock_sinks() -> Iterator[None]:
    """clock:// registered as a sink scheme for the block."""
    from streamnode.io import base

    Clock.instances.clear()
    base.register_sink("clock", Clock)
    try:
        yield
    finally:
        base._SINKS.pop("clock", None)
