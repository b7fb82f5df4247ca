"""The LoRA stack through a running node: /lora/N/... over real UDP, files read off the engine
thread while frames keep coming, bad LoRAs refused with one line, presets with `[[loras]]`.
Tiny model (each node loads its own), CPU, 64×64, a still test picture."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_files import ATTENTION, make_lora, private
from pythonosc.osc_message import OscMessage
from support import wait_osc
from test_regions_node import Latents, node_config, send, wait_until

from streamnode.diffusion import lora as lora_module
from streamnode.node import Node, build_engine


def own_engines(components):  # noqa: ANN001, ANN202
    """The node's own builder on a private copy of the tiny model per engine (a LoRA stack
    changes the UNet it is built on; no reload from disk per node)."""
    return lambda config: build_engine(config, components=private(components))


@pytest.fixture(scope="module")
def lora_file(tiny_components, tmp_path_factory) -> Path:  # noqa: ANN001
    return make_lora(tiny_components.unet, tmp_path_factory.mktemp("lora"), seed=5,
                     targets=[*ATTENTION, "proj_in", "conv1"], rank=4, alpha=8.0)


def wait_reply(sock: socket.socket, address: str, params: list[Any] | None = None, timeout: float = 30.0) -> list[Any]:
    """The first reply at `address` (with these params, when given: a new LoRA's fields are echoed
    as they appear, so a weight may be echoed at 1 before the value sent)."""
    msg = wait_osc(sock, lambda m: m.address == address and (params is None or m.params == params), timeout)
    assert msg is not None, f"no {address} {params or ''}"
    return msg.params


def wait_error(sock: socket.socket, needle: str, timeout: float = 30.0) -> str:
    def accept(m: OscMessage) -> bool:
        return m.address == "/streamnode/error" and bool(m.params) and needle in str(m.params[0])

    msg = wait_osc(sock, accept, timeout)
    assert msg is not None, f"no /streamnode/error mentioning {needle!r}"
    return str(msg.params[0])


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_loras_are_added_weighted_refused_and_removed_while_the_node_streams(
    tiny_components, lora_file, monkeypatch  # noqa: ANN001
) -> None:
    # Reading the file takes a second here, so the frames that keep coming meanwhile can be seen.
    real_read = lora_module.read_lora
    monkeypatch.setattr(lora_module, "read_lora", lambda *a, **k: (time.sleep(1.0), real_read(*a, **k))[1])
    surface = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    surface.bind(("127.0.0.1", 0))
    node = Node(node_config(sinks=["null://"], osc={"enabled": True, "port": 0, "reply_port": surface.getsockname()[1]}),
                engine_factory=own_engines(tiny_components))
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        engine = node.engine
        latents = Latents(engine)
        base = latents.after(3)
        port = node.osc_port

        # Hot add: the file is read on the lora-loader thread; the stream goes on meanwhile.
        frames = node.status()["frames_out"]
        send(surface, port, "/lora/0/source", str(lora_file))
        assert wait_reply(surface, "/streamnode/applied/lora/0/source") == [str(lora_file)]
        assert node.status()["frames_out"] >= frames + 2, "frames stopped while the LoRA was read"
        assert engine.loras.active == 1 and node.status()["loras"]["0"]["weight"] == 1.0
        assert maxdiff(latents.after(3), base) > 1e-2

        # The fader: weight 0 is the base model again, exactly.
        send(surface, port, "/lora/0/weight", 0.0)
        wait_reply(surface, "/streamnode/applied/lora/0/weight", [0.0])
        assert maxdiff(latents.after(3), base) <= 1e-6

        # A bad LoRA: one error line, nothing changes, the stream goes on.
        frames = node.status()["frames_out"]
        send(surface, port, "/lora/1/source", str(lora_file.parent / "missing.safetensors"))
        error = wait_error(surface, "lora 1")
        assert "no such LoRA file" in error and "\n" not in error
        send(surface, port, "/lora/2/source", "style.ckpt")  # refused at the OSC edge, before any read
        assert "pickle" in wait_error(surface, "/lora/2/source")
        wait_until(lambda: node.status()["frames_out"] >= frames + 3, what="frames after the refusal")
        assert set(node.live().loras) == {0} and node.status()["state"] == "streaming"

        # Hot remove: the UNet is the base model again, without a hook.
        send(surface, port, "/lora/0/clear")
        wait_reply(surface, "/streamnode/applied/lora/0/clear")
        assert node.live().loras == {} and not any(m._forward_hooks for m in engine.components.unet.modules())
    finally:
        node.stop()
        surface.close()


def test_merged_stack_from_a_preset_reweights_off_the_engine_thread(tiny_components, lora_file, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "styled.toml").write_text(
        f'[model]\nlora_mode = "merged"\n\n[[loras]]\nsource = {json.dumps(str(lora_file))}\nweight = 0.6\n')
    (presets / "plain.toml").write_text('[stream]\nprompt = "a dog"\n')
    monkeypatch.setenv("STREAMNODE_PRESETS", str(presets))
    surface = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    surface.bind(("127.0.0.1", 0))
    config = node_config(sinks=["null://"], model={"lora_mode": "merged"}, loras=[{"source": str(lora_file), "weight": 0.6}],
                         osc={"enabled": True, "port": 0, "reply_port": surface.getsockname()[1]})
    node = Node(config, engine_factory=own_engines(tiny_components))
    node.start()
    try:
        wait_until(lambda: node.status()["state"] == "streaming", what="streaming")
        engine = node.engine
        assert node.live().loras[0].weight == 0.6 and engine.loras.mode == "merged"
        merges = engine.loras.merges
        latents = Latents(engine)
        before = latents.after(3)
        send(surface, node.osc_port, "/lora/0/weight", 0.2)
        wait_reply(surface, "/streamnode/applied/lora/0/weight", [pytest.approx(0.2)])
        assert engine.loras.merges == merges + 1
        assert maxdiff(latents.after(3), before) > 1e-3

        # A preset without [[loras]] takes them away (merged: restored from the kept weights).
        send(surface, node.osc_port, "/preset", "plain")
        wait_until(lambda: node.live().loras == {}, what="the preset's (empty) stack")
        unet = engine.components.unet
        assert not engine.loras._base  # every touched weight copied back
        send(surface, node.osc_port, "/preset", "styled")
        wait_until(lambda: 0 in node.live().loras and engine.loras.active == 1, what="the preset's LoRA")
        assert node.live().loras[0].weight == 0.6 and unet is engine.components.unet
    finally:
        node.stop()
        surface.close()
