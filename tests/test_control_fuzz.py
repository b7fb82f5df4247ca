"""Fuzz the OSC server: random bytes and well-formed messages with wrong types, a few thousand
cases. No exception may escape message handling, everything that reaches the queue must be a
value the config would accept, and over real UDP the server keeps serving while frames flow."""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message_builder import OscMessageBuilder
from support import small_config, tiny_factory, wait_for, wait_osc

from streamnode.config import OscConfig, RuntimeConfig
from streamnode.control.osc import ADDRESSES, OscServer, value_at
from streamnode.control.updates import ControlQueue, Update
from streamnode.live_params import GROUPS, LiveParams, LiveState, NodeParams, validated
from streamnode.node import Node

FUZZ = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_MESSAGES = settings(FUZZ, max_examples=1200)  # with the bytes and in-range cases: ~3,000 in all

_ADDRESSES = sorted(
    {p.address.replace("/N/", f"/{n}/") for p in ADDRESSES for n in (0, 7, 8)}
)  # brush (and LoRA) 8 is one past max_brushes (max_loras)


class UdpRig:
    """A running node (the tiny model) with its OSC server, on loopback."""

    def __init__(self, components: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        cfg = small_config(**{"osc.enabled": True, "osc.port": 0, "osc.reply_port": self.sock.getsockname()[1]})
        self.node = Node(cfg, engine_factory=tiny_factory(components))
        self.node.start()
        wait_for(lambda: self.node.status()["state"] == "streaming", timeout=30, what="streaming")
        self.server = self.node._osc

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.server.port))

    def assert_alive(self) -> None:
        # The fuzzer may have paused the node (/pause 1 is a valid message): resume it first.
        for address in ("/pause", "/bypass"):
            resume = OscMessageBuilder(address)
            resume.add_arg(0, "i")
            self.send(resume.build().dgram)
        wait_for(lambda: not self.node.live().node.pause, timeout=5, what="resumed")
        frames = self.node.frames_out
        token = f"alive {time.monotonic_ns()}"  # unique: older echoes may still be queued
        marker = OscMessageBuilder("/prompt")
        marker.add_arg(token, "s")
        self.send(marker.build().dgram)
        echo = wait_osc(self.sock, lambda m: m.address == "/streamnode/applied/prompt" and m.params == [token], 10)
        assert echo is not None, "the server stopped applying values"
        assert all(t.is_alive() for t in self.server._threads)
        assert self.node.status()["state"] == "streaming"
        wait_for(lambda: self.node.frames_out > frames + 5, timeout=5, what="frames flowing")

    def close(self) -> None:
        self.node.stop()
        self.sock.close()


@pytest.fixture(scope="module")
def udp_rig(components):  # noqa: ANN001, ANN201
    rig = UdpRig(components)
    yield rig
    rig.close()


def direct_server() -> tuple[OscServer, ControlQueue]:
    """Not started: `_on_datagram` is called directly, so any escaping exception fails the test
    (the receive loop would have caught and logged it)."""
    queue = ControlQueue()
    return OscServer(OscConfig(port=0), queue), queue


ADDRESSES_BY_NAME = {p.address: p for p in ADDRESSES}


GROUP_SCHEMAS = {g.name: g.params for g in GROUPS}
GROUP_LIMITS = {g.name: getattr(RuntimeConfig(), g.limit) for g in GROUPS}  # brushes, LoRAs, LFOs: 8; cues 16


def assert_valid(update: Update) -> None:
    """Whatever passed the OSC checks must be a value the schema itself accepts."""
    if update.key in LiveParams.model_fields:
        LiveParams().apply({update.key: update.value})
    elif update.key in GROUP_SCHEMAS:
        n, field, value = update.value
        assert 0 <= n < GROUP_LIMITS[update.key]
        schema = GROUP_SCHEMAS[update.key]
        if field in schema.model_fields:
            validated(schema, {field: value})
        else:
            assert field == "clear" and value is None
    elif update.key == "brush_order":
        assert len(set(update.value)) == len(update.value)
        (arg,) = ADDRESSES_BY_NAME["/brush/order"].args
        assert all(isinstance(v, int) and arg.min <= v <= arg.max for v in update.value)
    elif update.key in NodeParams.model_fields:
        validated(NodeParams, {update.key: update.value})
        if update.key == "preset":
            assert update.value.replace("-", "").replace("_", "").isalnum()
    elif update.key in ("cue_next", "downbeat"):  # the node's own triggers
        assert update.value == (None, None, None)
    else:
        raise AssertionError(f"unexpected update {update}")


_ARG = st.one_of(
    st.tuples(st.just("i"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("h"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("f"), st.floats(width=32)),
    st.tuples(st.just("d"), st.floats()),
    st.tuples(st.just("s"), st.text(max_size=24)),
    st.tuples(st.just("T"), st.just(True)),
    st.tuples(st.just("F"), st.just(False)),
    st.tuples(st.just("N"), st.none()),
    st.tuples(st.just("b"), st.binary(max_size=8)),
)
OSC_ARGS = st.lists(_ARG, max_size=10)
"""(tag, value) lists: every type a surface may send, NaN, inf, int64 and blobs included."""


def build(address: str, args: list[tuple[str, Any]]) -> bytes | None:
    builder = OscMessageBuilder(address)
    for tag, value in args:
        builder.add_arg(value, tag)
    try:
        return builder.build().dgram
    except Exception:  # e.g. a string python-osc cannot encode: not a datagram anyone can send
        return None


def test_random_bytes(udp_rig: UdpRig) -> None:
    server, queue = direct_server()
    heads = st.sampled_from([b"", b"/", b"/guidance\x00\x00\x00", b"#bundle\x00", b"#bundle\x00" + bytes(8)])

    @FUZZ
    @given(head=heads, body=st.binary(max_size=300))
    def run(head: bytes, body: bytes) -> None:
        data = head + body
        server._on_datagram(data, "127.0.0.1")
        udp_rig.send(data)

    run()
    for update in queue.drain():
        assert_valid(update)
    udp_rig.assert_alive()


def test_well_formed_messages_with_wrong_types(udp_rig: UdpRig) -> None:
    server, queue = direct_server()
    addresses = st.one_of(st.sampled_from(_ADDRESSES), st.text(max_size=20).map(lambda t: "/" + t))

    @FUZZ_MESSAGES
    @given(address=addresses, args=OSC_ARGS)
    def run(address: str, args: list[tuple[str, Any]]) -> None:
        data = build(address, args)
        if data is None:
            return
        server._on_datagram(data, "127.0.0.1")
        for update in queue.drain():
            assert_valid(update)
        udp_rig.send(data)

    run()
    stats = server.stats()
    assert stats["rejected"] > 0 and stats["accepted"] > 0  # the fuzzer reached both sides
    udp_rig.assert_alive()


def test_well_formed_values_in_range_are_accepted() -> None:
    """The converse: a value inside every declared range goes through (types coerced)."""
    server, queue = direct_server()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        param = data.draw(st.sampled_from([p for p in ADDRESSES if p.kind == "value" and p.key not in
                                           ("preset", "model") and p.field not in ("mask", "shm", "map")]))
        lo, hi = param.repeat
        groups = data.draw(st.integers(lo, min(hi, 3)))
        args: list[tuple[str, Any]] = []
        for _ in range(groups):
            for a in param.args:
                if a.choices:
                    args.append(("s", data.draw(st.sampled_from(a.choices))))
                elif param.address in ("/lfo/N/target", "/midi/learn"):  # an address of a number
                    args.append(("s", data.draw(st.sampled_from(["", "/guidance", "/lora/1/weight"]))))
                elif a.tag == "s":
                    args.append(("s", data.draw(st.text(alphabet="abc xyz", max_size=30))))
                elif a.tag == "i":
                    v = data.draw(st.integers(int(a.min), int(min(a.max, 2**31 - 1))))
                    args.append(data.draw(st.sampled_from([("i", v), ("f", float(v)), ("d", float(v))])))
                else:
                    # The range's ends as 32-bit floats, rounded inward (0.95 has no exact one).
                    lo = float(np.nextafter(np.float32(a.min), np.float32(np.inf))) if np.float32(a.min) < a.min else a.min
                    hi = float(np.nextafter(np.float32(a.max), np.float32(-np.inf))) if np.float32(a.max) > a.max else a.max
                    v = data.draw(st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32))
                    args.append(data.draw(st.sampled_from([("f", v), ("d", v)])))
        if param.address in ("/t_index", "/brush/order"):
            ints = sorted({int(v) for _, v in args})  # strictly increasing, hence distinct
            args = [("i", v) for v in ints]
        if param.address.endswith("_blend"):
            args[1] = ("f", 1.0)  # weights must not all be 0
        address = param.address.replace("/N/", "/3/")
        before = server.stats()["rejected"]
        deduped = server.stats()["deduped"]
        server.forget(address)
        server._on_datagram(build(address, args), "127.0.0.1")
        assert server.stats()["rejected"] == before, (address, args)
        updates = queue.drain()
        if server.stats()["deduped"] > deduped:  # the value the (fresh) engine uses already
            assert not updates and value_at(LiveState(), param, 3 if param.group else None) is not None
            return
        assert len(updates) == 1
        assert_valid(updates[0])

    run()
