"""OSC → ControlQueue → a real StreamEngine (tiny model, 64×64, CPU): a prompt sent over UDP
changes the very next output frame, and every engine key the table produces is one the
engine accepts."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from streamnode.config import OscConfig
from streamnode.control.osc import ADDRESSES, OscServer
from streamnode.control.updates import ENGINE_KEYS, ControlQueue

stream = pytest.importorskip("streamnode.diffusion.stream")


def send(port: int, address: str, *args: object) -> None:
    builder = OscMessageBuilder(address)
    for a in args:
        builder.add_arg(a)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(builder.build().dgram, ("127.0.0.1", port))


def wait_queued(queue: ControlQueue, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not len(queue):
        assert time.monotonic() < deadline, "the update never reached the queue"
        time.sleep(0.002)


def engine(components, **kwargs):
    eng = stream.StreamEngine.from_components(components, t_index_list=[20, 35], width=64, height=64,
                                              cfg_type="none", **kwargs)
    eng.prepare(prompt="a dog")
    return eng


def test_a_prompt_sent_over_osc_changes_the_next_output_frame(tiny_components) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = engine(tiny_components, prompt_transition_frames=0)
    expected = [reference(frame) for _ in range(5)]

    eng = engine(tiny_components, prompt_transition_frames=0)
    queue = ControlQueue()
    server = OscServer(OscConfig(port=0), queue)
    server.start()
    try:
        outputs, applied_at = [], None
        for i in range(5):
            if i == 3:
                send(server.port, "/prompt", "a cat")
                wait_queued(queue)  # the node would simply pick it up at its next frame
            for update in queue.drain():  # between frames, as the node's engine thread does
                eng.update(**{update.key: update.value})
                queue.applied(update)
                applied_at = i
            outputs.append(eng(frame))
    finally:
        server.stop()
    assert applied_at == 3 and eng.params.prompt == "a cat"
    for i in range(3):
        np.testing.assert_array_equal(outputs[i], expected[i])  # same as without the message
    for i in range(3, 5):
        assert np.abs(outputs[i].astype(int) - expected[i]).mean() > 0  # changed from the next frame on


def test_every_engine_address_is_accepted_by_the_engine(tiny_components) -> None:
    eng = engine(tiny_components)
    queue = ControlQueue()
    server = OscServer(OscConfig(port=0), queue)
    sends = {
        "/prompt": ["a cat"], "/negative_prompt": ["blurry"], "/prompt/blend": ["a", 0.5, "b", 0.5],
        "/prompt/transition": [8], "/guidance": [1.5], "/delta": [0.5], "/strength": [0.4],
        "/t_index": [10, 30], "/seed": [3_000_000_000], "/seed/blend": [1, 0.5, 2, 0.5],
        "/similarity": [0.9], "/similarity/max_skip": [4], "/brush/order": [1, 0],
    }
    engine_addresses = {p.address for p in ADDRESSES if p.key in ENGINE_KEYS}
    assert set(sends) == engine_addresses
    frame = np.zeros((64, 64, 3), np.uint8)
    eng.update(brush=(0, "rect", (0.0, 0.0, 0.5, 0.5)))  # two brushes for /brush/order to order
    eng.update(brush=(1, "rect", (0.5, 0.5, 0.5, 0.5)))
    for address, args in sends.items():
        builder = OscMessageBuilder(address)
        for a in args:
            builder.add_arg(a)
        server._on_datagram(builder.build().dgram, "127.0.0.1")
        (update,) = queue.drain()
        eng.update(**{update.key: update.value})  # raises if the engine disagrees with the table
        eng(frame)
    assert eng.params.t_index_list == (10, 30) and eng.params.similarity_max_skip == 4
    assert eng.params.seed_blend == ((1, 0.5), (2, 0.5))
    assert eng.regions.order == (1, 0)
