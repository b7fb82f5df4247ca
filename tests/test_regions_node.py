"""Brushes through the node: /brush/N/... over real UDP, shm:// mask channels, presets with
`[[brushes]]`, and what a model switch carries over. Tiny model, CPU, 64×64."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from support import tiny_factory, wait_osc

from streamnode.config import BrushConfig, ConfigError, build_config, load_config
from streamnode.control.updates import Update
from streamnode.diffusion.stream import StreamEngine
from streamnode.frames import Frame
from streamnode.io import base
from streamnode.io.base import TransportError
from streamnode.io.shm import ShmSink
from streamnode.io.shm_masks import MaskChannelReader, MaskChannels, MaskChannelWriter, parse_mask_uri
from streamnode.node import Node, build_engine

SIZE = 64


class CaptureSink(base.Transport):
    """Counts the frames it is sent (registered as brushtest://)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.count = 0

    @classmethod
    def from_uri(cls, uri: str, target: str, params: Any, options: Any) -> CaptureSink:
        return cls(uri)

    def open(self) -> None:
        pass

    def send(self, frame: Frame) -> None:
        self.count += 1

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def capture_sink() -> Iterator[None]:
    base.register_sink("brushtest", CaptureSink)
    yield
    base._SINKS.pop("brushtest", None)


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def unique(name: str) -> str:
    return f"{name}{os.getpid() % 100000}"


def node_config(**extra: Any) -> Any:
    data = {
        "model": {"id": "tiny", "device": "cpu", "accel": "eager"},
        "stream": {"width": SIZE, "height": SIZE, "t_index_list": [32, 45], "cfg_type": "none", "prompt": "a dog",
                   "similarity_threshold": 0.0, "prompt_transition_frames": 0},
        "source": {"uri": "test://bars", "fps": 30},  # a still picture: latents only change with the brushes
        "sinks": ["brushtest://"],
        "osc": {"enabled": False},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(data)


class Latents:
    """Records the latents the running engine hands its decoder (the output before the VAE)."""

    def __init__(self, engine: StreamEngine) -> None:
        self.seen: list[torch.Tensor] = []
        self.lock = threading.Lock()
        decode = engine.vae_decode

        def recording(z: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.seen.append(z.detach().clone())
            return decode(z)

        engine.vae_decode = recording

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def after(self, n: int) -> torch.Tensor:
        """The latent of a frame produced after `n` more frames."""
        start = self.count()
        wait_until(lambda: self.count() >= start + n, what=f"{n} more frames")
        with self.lock:
            return self.seen[-1]


def changed_cells(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(h, w) bool: latent cells that differ (any channel)."""
    return (a - b).abs().amax(dim=(0, 1)) > 1e-3


def paints_inside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> bool:
    """The change from b to a lies in the mask: its mean there is many times that outside.

    Outside is not exactly unchanged: every layer sees the whole shared latent (convolutions,
    self-attention), which is what lets a brush blend into its surroundings.
    """
    change = (a - b).abs().mean(dim=(0, 1))
    inside, outside = float(change[mask > 0.5].mean()), float(change[mask == 0].mean())
    return inside > 0.005 and inside > 8 * outside


def send(sock: socket.socket, port: int, address: str, *args: Any) -> None:
    builder = OscMessageBuilder(address)
    for a in args:
        builder.add_arg(a)
    sock.sendto(builder.build().dgram, ("127.0.0.1", port))


def wait_applied(sock: socket.socket, address: str, params: list[Any] | None = None) -> list[Any]:
    def accept(msg: OscMessage) -> bool:
        assert msg.address != "/streamnode/error", msg.params
        return msg.address == "/streamnode/applied" + address and (params is None or msg.params == params)

    msg = wait_osc(sock, accept, 20)
    assert msg is not None, f"no applied echo for {address}"
    return msg.params


# -- OSC brush addresses, end to end ----------------------------------------------------------


def test_osc_brush_addresses_paint_regions_of_the_running_node(tiny_model_path, tmp_path) -> None:  # noqa: ANN001
    surface = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    surface.bind(("127.0.0.1", 0))
    node = Node(node_config(osc={"enabled": True, "port": 0, "reply_port": surface.getsockname()[1]}))
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        engine: StreamEngine = node.engine
        latents = Latents(engine)
        before = latents.after(2)
        port = node.osc_port
        assert port

        send(surface, port, "/brush/0/prompt", "roaring flames")
        send(surface, port, "/brush/0/rect", 0.0, 0.0, 0.5, 0.5)
        assert wait_applied(surface, "/brush/0/rect") == [0.0, 0.0, 0.5, 0.5]
        mask = engine.regions.mask(0)
        assert float(mask[:4, :4].min()) == 1.0 and float(mask.sum()) == 16.0  # the top-left quarter
        assert engine.layers == 2 and node.status()["brushes"]["0"]["prompt"] == "roaring flames"
        assert paints_inside(latents.after(3), before, mask)

        send(surface, port, "/brush/0/circle", 0.75, 0.75, 0.2)  # moves the brush's region
        wait_applied(surface, "/brush/0/circle")
        mask = engine.regions.mask(0)
        assert float(mask[:4, :4].max()) == 0.0 and float(mask[6, 6]) == 1.0
        assert set(node.status()["brushes"]["0"]) == {"prompt", "circle"}  # one mask source in force
        assert paints_inside(latents.after(3), before, mask)

        png = np.zeros((SIZE, SIZE), np.uint8)
        png[:, :16] = 255
        path = str(tmp_path / "left.png")
        cv2.imwrite(path, png)
        send(surface, port, "/brush/1/mask", path)
        send(surface, port, "/brush/1/blur", 8.0)
        wait_applied(surface, "/brush/1/blur")
        assert engine.regions.active == (0, 1) and float(engine.regions.mask(1)[:, 0].min()) > 0.5
        stages = engine.regions.stage_masks(1)
        assert bool((stages[1] >= stages[0]).all()) and bool((stages[1] > stages[0]).any())  # edges grow in

        assert engine.regions.order == (0, 1)
        send(surface, port, "/brush/order", 1, 0)  # brush 0 now covers brush 1 where they overlap
        wait_applied(surface, "/brush/order", [1, 0])
        assert engine.regions.order == (1, 0) and engine.regions.active == (1, 0)

        send(surface, port, "/brush/0/enabled", 0)
        wait_applied(surface, "/brush/0/enabled")
        assert engine.regions.active == (1,) and engine.batch_rows == 2 * 2
        send(surface, port, "/brush/0/clear")
        send(surface, port, "/brush/1/clear")
        wait_applied(surface, "/brush/1/clear")
        assert engine.regions.order == () and engine.batch_rows == 2 and node.status()["brushes"] == {}
        assert not changed_cells(latents.after(3), before).any()  # back to the global prompt everywhere
        assert node.status()["state"] == "streaming"
    finally:
        node.stop()
        surface.close()


# -- shm:// mask channels ----------------------------------------------------------------------


def test_shm_mask_channel_paints_brushes_of_the_running_node(tiny_model_path) -> None:
    name = unique("snmask")
    config = node_config(brushes=[{"prompt": "flames", "shm": f"shm://{name}"},
                                  {"prompt": "ocean", "shm": f"shm://{name}?plane=1"},
                                  {"prompt": "snow", "shm": f"shm://{name}?plane=0", "enabled": False}])
    node = Node(config)
    node.start()
    writer = None
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        engine: StreamEngine = node.engine
        assert engine.regions.order == (0, 1, 2) and engine.layers == 1  # no planes yet: nothing painted
        latents = Latents(engine)
        before = latents.after(1)

        writer = MaskChannelWriter(name, 32, 16, channels=2)  # any size: stretched over the frame
        planes = np.zeros((2, 16, 32), np.uint8)
        planes[0, :, :16] = 255  # brush 0: the left half
        writer.write(planes)
        wait_until(lambda: engine.regions.active == (0,), what="plane 0 applied")
        assert float(engine.regions.mask(0)[:, :4].min()) == 1.0 and float(engine.regions.mask(0)[:, 4:].max()) == 0
        assert paints_inside(latents.after(3), before, engine.regions.mask(0))

        planes[1, 8:, :] = 255  # brush 1: the bottom half, covering brush 0 where they overlap
        writer.write(planes)
        wait_until(lambda: engine.regions.active == (0, 1), what="plane 1 applied")
        assert float(engine.regions.weights[2, :, 4:, :].min()) == 1.0
        assert node.status()["brushes"]["1"] == {"prompt": "ocean", "shm": f"shm://{name}?plane=1"}
    finally:
        node.stop()
        if writer is not None:
            writer.close()


def test_mask_channels_hand_over_only_changed_planes_and_follow_writers() -> None:
    name = unique("snmch")
    channels = MaskChannels()
    channels.bind(0, f"shm://{name}")
    channels.bind(3, f"shm://{name}?plane=1")
    assert channels.poll() == []  # no writer yet
    with MaskChannelWriter(name, 8, 4, channels=2, fmt="maskf32") as writer:
        planes = np.zeros((2, 4, 8), np.float32)
        planes[1] = 0.25
        writer.write(planes)
        got = dict(channels.poll())
        assert set(got) == {0, 3} and float(got[3].max()) == 0.25
        writer.write(planes)
        assert channels.poll() == []  # a new frame with the same planes changes nothing
        planes[0, 0, 0] = 1.0
        writer.write(planes)
        assert [b for b, _ in channels.poll()] == [0]
        channels.bind(3, f"shm://{name}?plane=0")  # rebinding hands over the current plane at once
        assert [b for b, _ in channels.poll()] == [3]
    time.sleep(1.1)
    assert channels.poll() == []  # the writer closed: let go, wait for the next one
    with MaskChannelWriter(name, 8, 4, channels=1) as writer:
        writer.write(np.full((1, 4, 8), 255, np.uint8))
        wait_until(lambda: any(b == 0 and float(m.min()) == 1.0 for b, m in channels.poll()), 5, "the new writer")
    channels.close()


def test_mask_channels_refuse_frame_segments_and_bad_uris() -> None:
    name = unique("snfrm")
    sink = ShmSink(name, 8, 8)
    sink.open()
    try:
        sink.send(Frame(np.zeros((8, 8, 3), np.uint8), 1, time.monotonic_ns()))
        with pytest.raises(TransportError, match="mask channel"):
            MaskChannelReader(name).poll()
    finally:
        sink.close()
    assert parse_mask_uri("shm://abc?plane=3") == ("abc", 3)
    for bad in ["abc", "shm://abc?plane=x", "shm://abc?frame=1", "shm://"]:
        with pytest.raises(TransportError):
            parse_mask_uri(bad)
    with pytest.raises(TransportError), MaskChannelWriter(unique("snbad"), 8, 8, channels=0):
        pass


# -- presets, setup and model switches ---------------------------------------------------------


def test_brush_config_is_checked_where_it_enters() -> None:
    assert BrushConfig(shm="shm://m?plane=2").shm == "shm://m?plane=2"
    for fields, words in [({"rect": (0, 0, 2, 1)}, "0..1"), ({"mask": "m.jpg"}, ".png"),
                          ({"shm": "m"}, "shm://NAME"), ({"rect": (0, 0, 1, 1), "circle": (0, 0, 1)}, "one mask"),
                          ({"mask_blur": 300}, "256")]:
        with pytest.raises(ConfigError, match=words):
            build_config({"brushes": [fields]})
    with pytest.raises(ConfigError, match="max_brushes"):
        build_config({"brushes": [{}] * 3, "runtime": {"max_brushes": 2}})


def test_brushes_demo_preset_runs_with_its_brushes(tiny_model_path) -> None:
    config = load_config(preset="brushes-demo", overrides={
        "stream.width": SIZE, "stream.height": SIZE, "sinks": ["brushtest://"], "osc.enabled": False,
        "model.accel": "eager",
        "runtime.max_frames": 3, "runtime.duration": None,
    })
    assert [b.prompt for b in config.brushes] == ["roaring flames", "a stormy ocean", "a blazing sun"]
    engines: list[Any] = []
    node = Node(config, engine_factory=lambda cfg: engines.append(build_engine(cfg)) or engines[-1])
    assert node.run() == 0
    engine: StreamEngine = engines[0]
    assert engine.regions.active == (0, 1, 2) and engine.batch_rows == 2 * 4  # T·(brushes + 1)
    assert node.frames_out == 3 and set(node.status()["brushes"]) == {"0", "1", "2"}


def test_a_brush_that_cannot_be_applied_fails_the_start_with_the_reason(tiny_model_path, tmp_path) -> None:  # noqa: ANN001
    node = Node(node_config(brushes=[{"prompt": "flames", "mask": str(tmp_path / "missing.png")}]))
    assert node.run() == 1
    assert "brush 0" in node.status()["error"] and "no such file" in node.status()["error"]


def test_brushes_survive_a_model_switch(tiny_components, tiny_model_path) -> None:  # noqa: ANN001
    """Every brush in force, its mask (rect, circle, a plane from shm://) and the cover order
    reach the new engine: the node replays the engine's own snapshot."""
    name = unique("snsw")
    node = Node(node_config(runtime={"max_brushes": 4}, osc={"enabled": False, "allow_model_switch": True}),
                engine_factory=tiny_factory(tiny_components))
    writer = MaskChannelWriter(name, 16, 16, channels=3)
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        for edit in [(0, "prompt", "flames"), (0, "rect", (0.0, 0.0, 0.5, 1.0)), (0, "circle", (0.5, 0.5, 0.25)),
                     (2, "prompt", "ocean"), (2, "shm", f"shm://{name}"), (2, "mask_strength", 0.5),
                     (1, "prompt", "snow"), (1, "rect", (0.5, 0.0, 0.5, 0.5)), (1, "enabled", False)]:
            node.queue.put(Update("brush", edit))
            wait_until(lambda e=edit: e[0] in node.live().brushes and getattr(
                node.live().brushes[e[0]].params, e[1]) == e[2], what=f"{edit}")
        plane = np.zeros((3, 16, 16), np.uint8)
        plane[2, 4:12, 4:12] = 255
        writer.write(plane)
        wait_until(lambda: node.engine.regions.mask(2) is not None, what="the shm plane")
        node.queue.put(Update("brush_order", [2, 1, 0]))
        wait_until(lambda: node.live().brush_order == (2, 1, 0), what="the order")
        first = node.engine
        masks = {i: first.regions.mask(i) for i in (0, 1, 2)}
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        wait_until(lambda: node.engine is not first, timeout=60, what="the switch")
        second = node.engine
        assert second.regions.order == (2, 1, 0) and second.regions.active == (2, 0)  # 1 stays disabled
        for i in (0, 1, 2):
            assert second.regions.brushes[i].params == first.regions.brushes[i].params
            assert torch.equal(second.regions.mask(i), masks[i])
        assert node.live().brushes[2].params.shm == f"shm://{name}"
        plane[2] = 0
        plane[2, :4, :4] = 255
        writer.write(plane)  # the channel keeps feeding the new engine
        wait_until(lambda: float(second.regions.mask(2)[0, 0]) > 0 and float(second.regions.mask(2)[6, 6]) == 0,
                   what="the new plane on the new engine")
    finally:
        node.stop()
        writer.close()
