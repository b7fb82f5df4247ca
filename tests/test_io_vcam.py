"""vcam://: through pyvirtualcam.register_backend, paced by the node; and the missing-backend error."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

pyvirtualcam = pytest.importorskip("pyvirtualcam")

from streamnode.config import load_config  # noqa: E402
from streamnode.frames import Frame  # noqa: E402
from streamnode.io.base import TransportOptions, TransportUnavailable, create_sink, open_sink  # noqa: E402
from streamnode.node import Node  # noqa: E402


class FakeCamera:
    """A pyvirtualcam backend that records what it is sent (pyvirtualcam's Backend protocol)."""

    instances: list[FakeCamera] = []

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:  # noqa: ANN003
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self._device = device or "fake0"
        self.frames: list[tuple[float, np.ndarray]] = []
        self.closed = 0
        self.lock = threading.Lock()
        FakeCamera.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        with self.lock:
            self.frames.append((time.monotonic(), frame.copy()))

    def close(self) -> None:
        self.closed += 1

    def device(self) -> str:
        return self._device

    def native_fourcc(self) -> int | None:
        return None


@pytest.fixture
def fake_backend():  # noqa: ANN201
    FakeCamera.instances.clear()
    pyvirtualcam.register_backend("streamnode-test", FakeCamera)
    yield FakeCamera
    pyvirtualcam.camera.BACKENDS.pop("streamnode-test", None)


def test_sends_rgb_frames_to_the_backend(fake_backend: type[FakeCamera]) -> None:
    options = TransportOptions(width=32, height=16, fps=20)
    with open_sink("vcam://my cam?backend=streamnode-test", options) as sink:
        cam = fake_backend.instances[-1]
        assert (cam.width, cam.height, cam.fps, cam._device) == (32, 16, 20, "my cam")
        assert sink.pace_fps == 20
        img = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)
        sink.send(Frame(img, 1, 0))
        np.testing.assert_array_equal(cam.frames[-1][1].reshape(16, 32, 3), img)
    assert cam.closed == 1
    sink.close()  # twice is fine
    assert cam.closed == 1


def test_the_node_paces_the_camera_without_slowing_the_engine(fake_backend: type[FakeCamera]) -> None:
    """A 5 fps source into a 40 fps camera: the camera still gets ~40 fps (the last frame
    repeated), and a null sink beside it gets each frame once."""
    config = load_config(overrides={
        "source.uri": "test://moving?fps=5", "sinks": ["vcam://?backend=streamnode-test&fps=40", "null://"],
        "stream.width": 64, "stream.height": 64, "runtime.engine": "passthrough", "osc.enabled": False,
        "runtime.duration": 1.0,
    })
    node = Node(config)
    assert node.run() == 0
    cam = fake_backend.instances[-1]
    times = [t for t, _ in cam.frames]
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 30 <= rate <= 45, rate
    sinks = {s["uri"]: s for s in node.status()["sinks"]}
    assert sinks["null://"]["sent"] <= 8
    assert cam.closed == 1


def test_an_unknown_backend_is_refused_at_startup(fake_backend: type[FakeCamera]) -> None:
    with pytest.raises(TransportUnavailable, match="no backend 'obs-nope'"):
        create_sink("vcam://?backend=obs-nope")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux install hint")
def test_missing_backend_error_names_what_to_install() -> None:
    if any(__import__("os").path.exists(f"/dev/video{i}") for i in range(100)):
        pytest.skip("this machine has video devices; v4l2loopback may be loaded")
    sink = create_sink("vcam://", TransportOptions(width=32, height=32))
    with pytest.raises(TransportUnavailable) as err:
        sink.open()
    message = str(err.value)
    assert "modprobe v4l2loopback exclusive_caps=1" in message
    assert "v4l2loopback" in message and "No v4l2 loopback device" in message  # pyvirtualcam's own reason


def test_the_node_refuses_to_start_without_a_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamnode.node import StartupError

    monkeypatch.setattr(pyvirtualcam.camera, "BACKENDS", {})
    config = load_config(overrides={"sinks": ["vcam://"], "runtime.engine": "passthrough", "osc.enabled": False,
                                    "stream.width": 64, "stream.height": 64})
    with pytest.raises(StartupError, match="no virtual camera"):
        Node(config).run()
