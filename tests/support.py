"""What several test files share: waiting for a condition, a free loopback port, loading a
kit script (TouchDesigner, OBS) by path the way its host application would."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
import types
from collections.abc import Callable
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
