"""ControlNets through a running node: /controlnet/N/... over real UDP, the model loaded off the
engine thread, a bad net refused with one line, an external map from shm:// used on the next
frames and held when its writer goes. Tiny model, CPU, 64×64, a still test picture."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import pytest
import torch
from support import wait_osc
from test_regions_node import Latents, node_config, send, wait_until

from streamnode.config import load_config
from streamnode.diffusion.tiny_controlnet import random_controlnet
from streamnode.frames import Frame
from streamnode.io.base import TransportOptions, open_sink
from streamnode.node import Node, build_engine

SIZE = 64


@pytest.fixture(scope="module")
def net_folder(tiny_components, tmp_path_factory) -> str:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("controlnet-node")
    random_controlnet(tiny_components.unet, 3).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_controlnets_over_osc_and_an_external_shm_map(tiny_components, net_folder) -> None:  # noqa: ANN001
    name = f"sn_cn{os.getpid() % 100000}"
    surface = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    surface.bind(("127.0.0.1", 0))
    config = node_config(sinks=["null://"], osc={"enabled": True, "port": 0, "reply_port": surface.getsockname()[1]})
    node = Node(config, engine_factory=lambda cfg: build_engine(cfg, components=tiny_components))
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        engine = node.engine
        latents = Latents(engine)
        base = latents.after(2)
        port = node.osc_port

        # A bad net: one line back, the stream goes on.
        send(surface, port, "/controlnet/0/model", "/nowhere/controlnet")
        msg = wait_osc(surface, lambda m: m.address == "/streamnode/error" and "controlnet 0" in str(m.params[0]), 30)
        assert msg is not None and "no such file" in str(msg.params[0]) and "\n" not in str(msg.params[0])
        assert maxdiff(latents.after(2), base) <= 1e-5

        # A net with an external map: nothing changes until the first map arrives.
        send(surface, port, "/controlnet/0/map", f"shm://{name}")
        send(surface, port, "/controlnet/0/model", net_folder)
        wait_until(lambda: node.status()["controlnets"].get("0", {}).get("model") == net_folder, what="net loaded")
        assert maxdiff(latents.after(2), base) <= 1e-5
        ramp = np.repeat(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], SIZE, axis=0).repeat(3, axis=2)
        with open_sink(f"shm://{name}", TransportOptions(width=SIZE, height=SIZE)) as sink:
            sink.send(Frame(np.ascontiguousarray(ramp), 1, 0))
            wait_until(lambda: node.status()["control_maps_in"].get("0", 0) >= 1, what="the map read")
            with_ramp = latents.after(3)
            assert maxdiff(with_ramp, base) > 1e-2
            checker = np.kron((np.indices((8, 8)).sum(0) % 2).astype(np.uint8) * 255, np.ones((8, 8), np.uint8))
            sink.send(Frame(np.ascontiguousarray(np.repeat(checker[:, :, None], 3, axis=2)), 2, 0))
            wait_until(lambda: node.status()["control_maps_in"].get("0", 0) >= 2, what="the second map read")
            with_checker = latents.after(3)
            assert maxdiff(with_checker, with_ramp) > 1e-2
        # The writer is gone: the last map holds.
        assert maxdiff(latents.after(3), with_checker) <= 1e-5

        # A built-in preprocessor: the maps are made on the controlmap:0 thread, frame by frame.
        send(surface, port, "/controlnet/0/map", "edges-soft")
        wait_until(lambda: node.status()["control_maps_in"].get("0", 0) >= 3, what="preprocessed maps")
        assert "controlmap:0" in node.busy_threads()
        assert maxdiff(latents.after(3), with_checker) > 1e-2

        # A map source nobody can open (an unknown scheme): one line in the status, the stream goes on.
        send(surface, port, "/controlnet/0/map", "nosuch://map")
        wait_until(lambda: "nosuch" in node.status()["control_map_errors"].get("0", ""), what="source refused")
        latents.after(2)
        assert node.status()["state"] == "streaming"

        # A depth model that cannot be loaded: one line in the status, the stream goes on.
        send(surface, port, "/controlnet/0/map", "depth:/nowhere/depth")
        wait_until(lambda: "cannot load" in node.status()["control_map_errors"].get("0", ""), what="depth refused")
        latents.after(2)

        # Scale 0 over OSC: back to the plain stream.
        send(surface, port, "/controlnet/0/scale", 0.0)
        wait_until(lambda: node.status()["controlnets"]["0"]["scale"] == 0.0, what="scale 0")
        latents.after(2)
        assert maxdiff(latents.after(2), base) <= 1e-5
        send(surface, port, "/controlnet/0/clear", 1)
        wait_until(lambda: node.status()["controlnets"] == {}, what="cleared")
    finally:
        node.stop()
        surface.close()


def test_controlnet_demo_preset_runs_with_its_nets(tiny_components) -> None:  # noqa: ANN001
    config = load_config(preset="controlnet-demo", overrides={
        "stream.width": SIZE, "stream.height": SIZE, "sinks": ["null://"], "osc.enabled": False,
        "model.accel": "eager", "runtime.max_frames": 3, "runtime.duration": None,
    })
    assert [(n.model, n.map) for n in config.controlnets] == [("tiny", "canny"), ("tiny", "luma")]
    engines: list[Any] = []
    handed: list[tuple[int, bool]] = []

    def factory(cfg):  # noqa: ANN001, ANN202
        engine = build_engine(cfg, components=tiny_components)
        own = engine.set_control_map
        engine.set_control_map = lambda i, image, derived=False: (handed.append((i, derived)), own(i, image, derived=derived))
        engines.append(engine)
        return engine

    node = Node(config, engine_factory=factory)
    assert node.run() == 0
    assert node.frames_out == 3 and set(node.status()["controlnets"]) == {"0", "1"}
    # --no-drop: every frame got both maps from the preprocessor threads, none made on the engine thread.
    assert handed.count((0, True)) >= 3 and handed.count((1, True)) >= 3
    # Both nets ran in every UNet call (warm fill included): their residuals reached the stream.
    assert engines[0].controlnets.stats["controlnet_calls"] == 2 * engines[0].stats["unet_calls"]


def test_a_controlnet_that_cannot_be_loaded_fails_the_start_with_the_reason(tiny_components, tmp_path) -> None:  # noqa: ANN001
    node = Node(node_config(sinks=["null://"], controlnets=[{"model": str(tmp_path / "missing")}]),
                engine_factory=lambda cfg: build_engine(cfg, components=tiny_components))
    assert node.run() == 1
    assert "controlnet 0" in node.status()["error"] and "no such file" in node.status()["error"]


def test_controlnets_and_their_held_map_survive_a_model_switch(tiny_components, tiny_model_path, net_folder) -> None:  # noqa: ANN001
    """The new engine gets the nets (loaded again for its UNet) and the external map in force,
    though the still source sends no more."""
    from support import tiny_factory

    from streamnode.control.updates import Update

    name = f"sn_cnsw{os.getpid() % 100000}"
    node = Node(node_config(sinks=["null://"], osc={"enabled": False, "allow_model_switch": True},
                            controlnets=[{"model": net_folder, "map": f"shm://{name}"}]),
                engine_factory=tiny_factory(tiny_components))
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        first = node.engine
        ramp = np.repeat(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], SIZE, axis=0).repeat(3, axis=2)
        with open_sink(f"shm://{name}", TransportOptions(width=SIZE, height=SIZE)) as sink:
            sink.send(Frame(np.ascontiguousarray(ramp), 1, 0))
            wait_until(lambda: first.controlnets.stats["controlnet_calls"] > 0, what="the map in use")
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        wait_until(lambda: node.engine is not first, timeout=60, what="the switch")
        second = node.engine
        assert second.live_params().controlnets == first.live_params().controlnets
        wait_until(lambda: second.controlnets.stats["controlnet_calls"] > 0, what="the held map on the new engine")
    finally:
        node.stop()
