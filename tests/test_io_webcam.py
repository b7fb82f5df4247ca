"""webcam://: device resolution and the error paths (CI has no camera); a missing camera never
stops the node, which sends black until it appears."""

from __future__ import annotations

import sys
import time

import pytest

from streamnode.config import load_config
from streamnode.io import webcam
from streamnode.io.base import TransportError, create_source
from streamnode.node import Node


def test_index_and_device_node_targets() -> None:
    assert webcam.resolve_device("3") == 3
    assert webcam.resolve_device("/dev/video9") == "/dev/video9"
    source = create_source("webcam://2?size=1280x720&fps=60")
    assert (source.device, source.size, source.fps) == (2, (1280, 720), 60.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names resolve through sysfs on Linux")
def test_unknown_device_name_lists_what_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webcam, "_linux_devices", lambda: [(0, "Integrated Camera"), (4, "OBS Virtual Camera")])
    assert webcam.resolve_device("obs virtual camera") == 4
    assert webcam.resolve_device("Integrated") == 0
    with pytest.raises(TransportError, match="'Integrated Camera', 'OBS Virtual Camera'"):
        webcam.resolve_device("Capture Card")
    assert webcam.list_devices() == [("webcam://0", "Integrated Camera (/dev/video0)"),
                                     ("webcam://4", "OBS Virtual Camera (/dev/video4)")]


def test_a_missing_camera_is_retried_while_the_node_sends_black() -> None:
    cfg = load_config(overrides={
        "source.uri": "webcam:///dev/video97", "sinks": ["null://"], "stream.width": 64, "stream.height": 64,
        "runtime.engine": "passthrough", "osc.enabled": False, "source.hold_after_s": 0.1, "source.fps": 30,
    })
    with Node(cfg) as node:
        time.sleep(0.8)
        st = node.status()
        assert st["frames_out"] >= 10 and st["source"]["holding"] and not st["source"]["receiving"]
