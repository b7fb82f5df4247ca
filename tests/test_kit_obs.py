"""The OBS kit (obs/): its OSC core against the node's real OSC server (and the real node
program), the heartbeat watchdog, and the OBS script itself driven through a stand-in
`obspython` module.

OBS itself (the real obspython API, scene switching through its frontend, obs-websocket) is
tested in tests/test_kit_obs_studio.py, which starts a real OBS under Xvfb.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from support import free_udp_port, load_script, small_config, wait_for

import streamnode.control.osc as osc_mod
from streamnode.control.osc import ADDRESSES
from streamnode.control.updates import Update
from streamnode.live_params import LiveParams
from streamnode.node import Node

ROOT = Path(__file__).resolve().parent.parent
OBS_DIR = ROOT / "obs"


core = load_script(OBS_DIR / "streamnode_obs_core.py", "streamnode_obs_core")


class LiveNode:
    """A real node (pass-through engine, a test pattern in, nothing out) with its OSC server:
    what the kit sends goes through the node's own queue, apply and report."""

    def __init__(self, reply_port: int, port: int = 0, prefix: str = "") -> None:
        self.applied: list[Update] = []
        cfg = small_config(**{"runtime.engine": "passthrough", "osc.enabled": True, "osc.port": port,
                              "osc.reply_port": reply_port, "osc.prefix": prefix})
        self.node = Node(cfg)
        self.node.queue.on_report(lambda u, error: error is None and self.applied.append(u))
        self.node.start()
        self.server = self.node._osc
        self.port = self.node.osc_port
        wait_for(lambda: self.node.status()["state"] == "streaming", what="the node streaming")

    def value(self, key: str) -> Any:
        """The value in force for a live key (None: not in force, or never sent)."""
        live = self.node.live()
        if key in live.params.model_fields:
            value = getattr(live.params, key)
            return None if value == getattr(LiveParams(), key) and not any(u.key == key for u in self.applied) \
                else value
        return getattr(live.node, key)

    def close(self) -> None:
        self.node.stop()


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(osc_mod, "_HEARTBEAT_S", 0.1)  # the node beats 10x faster in these tests


@pytest.fixture
def link() -> Iterator[Any]:
    with core.NodeLink("127.0.0.1", 1, reply_port=0) as lk:
        yield lk


@pytest.fixture
def node(link: Any) -> Iterator[LiveNode]:
    n = LiveNode(reply_port=link.port)
    link.target = ("127.0.0.1", n.port)
    yield n
    n.close()


# -- the OSC codec ------------------------------------------------------------------------------

MESSAGES = [
    ("/prompt", ["a neon city at night"]),
    ("/prompt", ["é ü 日本 — unicode"]),
    ("/guidance", [1.25]),
    ("/seed", [2**32 - 1]),
    ("/seed", [7]),
    ("/t_index", [20, 35, 45]),
    ("/prompt_blend", ["a", 0.5, "bb", 0.5]),
    ("/status", []),
    ("/x", [True, False, None, ""]),
]


@pytest.mark.parametrize(("address", "args"), MESSAGES)
def test_codec_matches_python_osc(address: str, args: list[Any]) -> None:
    data = core.encode_message(address, args)
    parsed = OscMessage(data)
    assert parsed.address == address
    expected = [pytest.approx(a) if isinstance(a, float) else a for a in args]
    assert list(parsed.params) == expected
    builder = OscMessageBuilder(address=address)
    for a in args:
        builder.add_arg(a)
    assert core.decode_message(builder.build().dgram) == (address, expected)


def test_decode_rejects_garbage_without_raising_anything_else() -> None:
    for data in [b"", b"abc", b"/a\x00\x00,q\x00\x00", b"/a\x00\x00,i\x00\x00\x00", b"\xff\xfe\x00\x00",
                 b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4)]:
        with pytest.raises(ValueError):
            core.decode_packet(data)


def test_decode_bundle() -> None:
    inner = [core.encode_message("/streamnode/fps", [12.5]), core.encode_message("/streamnode/state", ["streaming"])]
    bundle = b"#bundle\x00" + b"\x00" * 7 + b"\x01" + b"".join(struct.pack(">i", len(m)) + m for m in inner)
    assert core.decode_packet(bundle) == [("/streamnode/fps", [12.5]), ("/streamnode/state", ["streaming"])]


# -- the controls mirror the node's table --------------------------------------------------------


def test_controls_match_the_node_address_table() -> None:
    table = {p.address: p for p in ADDRESSES}
    # Every address the kit sends is in one place, and the node has each of them.
    assert {c.address for c in core.CONTROLS} == set(core.CONTROL_ADDRESSES.values())
    assert set(core.CONTROL_ADDRESSES.values()) | {core.STATUS_REQUEST} <= set(table)
    assert table[core.STATUS_REQUEST].args == ()
    for c in core.CONTROLS:
        p = table[c.address]
        assert p.repeat == (1, 1) and len(p.args) == 1, c.address
        arg = p.args[0]
        if c.kind in ("text", "choice"):
            assert arg.tag == "s" and c.max_len == arg.max_len, c.address
        else:
            assert arg.tag == ("i" if c.kind == "int" else "f"), c.address
            assert c.min == arg.min, c.address
            # OBS int properties are C ints: the seed may stop below the node's maximum.
            assert c.max == arg.max or (c.kind == "int" and c.max == 2**31 - 1 and arg.max > c.max), c.address
        if p.default is not None and c.kind != "choice":
            assert c.default == p.default, c.address
    shipped = {f.stem for f in (ROOT / "presets").glob("*.toml")}
    assert set(core.SHIPPED_PRESETS) <= shipped


# -- sending to a live node -----------------------------------------------------------------------


def test_every_control_reaches_the_engine(link: Any, node: LiveNode) -> None:
    session = core.NodeSession(link)
    outbox = core.Outbox(text_delay_s=0.0)
    values = {"prompt": "a neon city", "negative_prompt": "blurry", "guidance": 1.5, "strength": 0.4,
              "seed": 123, "preset": "demo"}
    outbox.update(values, now=0.0)
    sent: list[str] = []

    def step() -> bool:
        now = time.monotonic()
        session.tick(now)
        for address, args in outbox.due(now, session.monitor):
            assert link.send(address, *args)
            sent.append(address)
        return len(sent) == 6

    wait_for(step)
    # The preset first and alone; the rest once the node said it applied the preset.
    assert sent == ["/preset", "/prompt", "/negative_prompt", "/guidance", "/strength", "/seed"]
    assert [u.key for u in node.applied][0] == "preset"
    wait_for(lambda: node.value("seed") == 123)
    assert node.value("prompt") == "a neon city"
    assert node.value("negative_prompt") == "blurry"
    assert node.value("guidance_scale") == pytest.approx(1.5)
    assert node.value("strength") == pytest.approx(0.4)
    assert node.value("seed") == 123
    assert node.server.stats()["rejected"] == 0


def test_replies_fill_the_monitor(link: Any, node: LiveNode) -> None:
    session = core.NodeSession(link)
    session.send("/guidance", 2.0)

    def seen() -> bool:
        session.tick()
        m = session.monitor
        # The reply to the kit's hello may carry the value before the echo of the new one.
        return bool(m.heartbeat and m.fps and m.latency_ms is not None and m.applied.get("/guidance") == 2.0)

    wait_for(seen)
    m = session.monitor
    st = node.node.status()
    assert m.state == "streaming" and m.healthy(time.monotonic())
    assert m.fps > 0 and m.latency_ms >= 0 and m.dropped >= 0 and m.skipped == st["skipped"] == 0
    assert m.applied["/guidance"] == pytest.approx(2.0)
    assert m.summary(time.monotonic()).startswith(f"streaming · {m.fps:.1f} fps · ")


def test_a_rejected_value_comes_back_as_an_error(link: Any, node: LiveNode) -> None:
    session = core.NodeSession(link)
    session.send("/guidance", 99.0)  # above the table's maximum

    def errored() -> bool:
        session.tick()
        return "out of range" in session.monitor.error

    wait_for(errored)


def test_hello_registers_with_a_node_that_does_not_know_us(link: Any, node: LiveNode) -> None:
    """A (re)started node replies only to who spoke to it: the session's /status does that."""
    session = core.NodeSession(link, hello_interval_s=0.05)
    wait_for(lambda: (session.tick(), session.monitor.alive(time.monotonic()))[1])
    assert session.monitor.connects == 1


def test_prefix_on_both_directions(link: Any) -> None:
    n = LiveNode(reply_port=link.port, prefix="/vj1")
    try:
        link.target = ("127.0.0.1", n.port)
        session = core.NodeSession(link, prefix="/vj1")
        session.send("/seed", 77)
        wait_for(lambda: (session.tick(), session.monitor.applied.get("/seed") == 77)[1])
        assert n.value("seed") == 77
        other = core.NodeMonitor()  # no prefix: the prefixed replies are not its node's
        assert not other.on_message("/vj1/streamnode/heartbeat", [3], 0.0)
    finally:
        n.close()


def test_link_survives_a_taken_reply_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        with core.NodeLink("127.0.0.1", 9, reply_port=busy.getsockname()[1]) as lk:
            assert lk.listen_error and "--osc-reply" in lk.listen_error
            assert lk.port != busy.getsockname()[1]
            assert lk.poll() == []


# -- the outbox ----------------------------------------------------------------------------------


def test_outbox_sends_changes_only_and_debounces_text() -> None:
    box = core.Outbox(text_delay_s=0.5)
    box.baseline({"prompt": "a", "guidance": 1.2, "seed": 2, "preset": ""})
    box.update({"prompt": "a", "guidance": 1.2, "seed": 2, "preset": ""}, now=0.0)
    assert box.due(10.0) == []  # the baseline is what the node has
    box.update({"guidance": 1.4}, now=1.0)
    assert box.due(1.0) == [("/guidance", [1.4])]  # numbers at once
    for i, text in enumerate(["a c", "a ca", "a cat"]):
        box.update({"prompt": text}, now=2.0 + i * 0.1)
    assert box.due(2.3) == []  # still typing
    assert box.due(2.8) == [("/prompt", ["a cat"])]
    assert box.due(5.0) == []
    box.update({"preset": ""}, now=6.0)
    assert box.due(7.0) == []  # no preset chosen: nothing to send
    box.update({"guidance": 25.0}, now=8.0)
    assert box.due(8.0) == [] and "outside" in box.errors["guidance"]
    box.resend_all({"prompt": "a cat", "guidance": 1.4, "seed": 2, "preset": ""}, now=9.0)
    assert [a for a, _ in box.due(9.0)] == ["/prompt", "/guidance", "/seed"]
    box.resend_all({"prompt": "", "guidance": 1.4}, now=10.0)
    assert box.due(10.0) == [("/guidance", [1.4])]  # an empty box never wipes the node's prompt
    box.update({"preset": "s"}, now=11.0)
    box.update({"preset": "sd-turbo"}, now=11.2)  # typed into the editable list
    assert box.due(11.3) == [] and box.due(11.8) == [("/preset", ["sd-turbo"])]


def test_outbox_sends_a_preset_before_the_values_it_would_overwrite() -> None:
    box = core.Outbox(text_delay_s=0.5, preset_wait_s=2.0)
    values = {"prompt": "a paper lantern festival", "guidance": 2.0, "seed": 7, "preset": "demo"}
    box.resend_all(values, now=0.0)
    node = core.NodeMonitor()
    node.on_message("/streamnode/applied/preset", ["sd-turbo"], -5.0)
    assert box.due(0.0, node) == [("/preset", ["demo"])]
    assert box.due(0.1, node) == []  # an echo of an earlier preset does not count
    node.on_message("/streamnode/applied/preset", ["demo"], 0.2)  # the node applied this one
    assert box.due(0.3, node) == [("/prompt", ["a paper lantern festival"]), ("/guidance", [2.0]), ("/seed", [7])]
    # The node's latest echo is this preset: it will drop the repeat, and send no echo.
    box.resend_all(values, now=10.0)
    assert [a for a, _ in box.due(10.0, node)] == ["/preset", "/prompt", "/guidance", "/seed"]
    node.on_message("/streamnode/applied/guidance", [2.0], 10.1)
    box.resend_all(values, now=20.0)
    assert box.due(20.0, node) == [("/preset", ["demo"])]
    assert box.due(21.9, node) == []
    assert [a for a, _ in box.due(22.0, node)] == ["/prompt", "/guidance", "/seed"]  # no echo: not forever


# -- the node's status ----------------------------------------------------------------------------


def test_the_status_line_forgets_a_stopped_node() -> None:
    """A restarted node's status shows its own numbers, not the latency of the one before."""
    m = core.NodeMonitor(timeout_s=3.0)
    for t in (0.0, 1.0, 2.0):
        for address, args in (("state", ["streaming"]), ("heartbeat", [int(t) + 1]), ("fps", [14.8]),
                              ("latency_ms", [62.0]), ("applied/prompt", ["a cat"])):
            m.on_message("/streamnode/" + address, args, t)
    assert m.summary(2.0) == "streaming · 14.8 fps · 62 ms"
    # Stopped; a new one starts 10 s later, warming up: no fps or latency yet.
    m.on_message("/streamnode/state", ["warming_up"], 12.0)
    m.on_message("/streamnode/heartbeat", [1], 12.0)
    assert m.summary(12.0) == "warming_up" and m.applied == {} and m.connects == 2
    # Restarted within the timeout (a service manager): the heartbeat counts from 1 again.
    for address, args in (("heartbeat", [2]), ("state", ["streaming"]), ("latency_ms", [40.0])):
        m.on_message("/streamnode/" + address, args, 13.0)
    m.on_message("/streamnode/state", ["warming_up"], 14.0)
    m.on_message("/streamnode/heartbeat", [1], 14.0)
    assert m.summary(14.0) == "warming_up" and m.connects == 3


def test_the_condition_changes_only_with_the_node() -> None:
    m = monitor_at(0.0)
    assert m.condition(1.0) == "node streaming"
    silent = {m.condition(t) for t in (4.0, 5.0, 6.0, 30.0)}
    assert len(silent) == 1 and "silent" in silent.pop()
    assert m.summary(5.0) != m.summary(6.0)  # the label counts the seconds; the log line does not


# -- the fallback logic --------------------------------------------------------------------------


class FakeScenes:
    """OBS's scenes as the fallback sees them, with OBS's answers: LookupError for a scene it
    does not have, ObsUnavailable while it is away."""

    def __init__(self, current: str = "Live", names: tuple[str, ...] = ("Live", "BRB", "Interview")) -> None:
        self.scene = current
        self.scene_names = list(names)
        self.switches: list[str] = []
        self.away = False
        self.calls = 0

    def _ask(self) -> None:
        self.calls += 1
        if self.away:
            raise core.ObsUnavailable("nothing answers at 127.0.0.1:4455")

    def current(self) -> str | None:
        self._ask()
        return self.scene

    def names(self) -> list[str]:
        self._ask()
        return list(self.scene_names)

    def switch(self, name: str) -> None:
        self._ask()
        if name not in self.scene_names:
            raise LookupError(f"OBS has no scene named {name!r}")
        self.switches.append(name)
        self.scene = name


def monitor_at(healthy_until: float | None, state: str = "streaming") -> Any:
    m = core.NodeMonitor(timeout_s=3.0)
    if healthy_until is not None:
        m.on_message("/streamnode/state", [state], healthy_until)
        m.on_message("/streamnode/heartbeat", [1], healthy_until)
    return m


def beat(m: Any, t: float) -> None:
    m.on_message("/streamnode/heartbeat", [(m.heartbeat or 0) + 1], t)


def test_fallback_arms_only_after_the_node_was_seen() -> None:
    scenes = FakeScenes()
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB"), scenes)
    assert switcher.step(monitor_at(None), 100.0) is None  # never seen: do nothing
    armed = core.FallbackSwitcher(core.SceneFallback("BRB", arm_at_start=True), scenes)
    assert armed.step(monitor_at(None), 100.0) == "BRB"


def test_fallback_cuts_after_the_timeout_and_back_after_recovery() -> None:
    scenes = FakeScenes("Live")
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB", recover_s=2.0), scenes)
    m = monitor_at(0.0)
    assert switcher.step(m, 1.0) is None and switcher.fallback.armed
    assert switcher.step(m, 2.9) is None  # 2.9 s since the last beat: still fine
    assert switcher.step(m, 3.5) == "BRB"
    assert switcher.step(m, 4.0) is None  # stays, no repeated switching
    m.on_message("/streamnode/state", ["streaming"], 10.0)  # a new node says its state, then beats
    for t in (10.0, 11.0):
        beat(m, t)
        assert switcher.step(m, t) is None  # healthy, but not for 2 s yet
    beat(m, 12.0)
    assert switcher.step(m, 12.0) == "Live"
    assert scenes.switches == ["BRB", "Live"]


def test_fallback_on_error_state_and_warmup() -> None:
    scenes = FakeScenes("Live")
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB"), scenes)
    m = monitor_at(0.0)
    switcher.step(m, 0.5)
    m.on_message("/streamnode/state", ["error"], 1.0)
    beat(m, 1.0)
    assert switcher.step(m, 1.0) == "BRB"  # beating, but broken
    m.on_message("/streamnode/state", ["warming_up"], 5.0)
    beat(m, 5.0)
    assert switcher.step(m, 8.0) is None  # warming up: not worth showing yet


def test_the_operator_wins_over_the_fallback() -> None:
    """Once the operator picks a scene during an outage, the fallback leaves OBS alone until the
    node has recovered, does not cut back over their choice, and cuts again at the next outage."""
    fb = core.SceneFallback("BRB", recover_s=1.0)
    fb.settle_s = 0.5
    assert fb.step(True, 0.0, "Live") is None
    assert fb.step(False, 5.0, "Live") == "BRB"
    assert fb.step(False, 5.1, "Live") is None  # OBS still fading to BRB: not the operator
    # The operator takes over, still during the outage; ticks come every 100 ms.
    assert [fb.step(False, 6.0 + i / 10, "Interview") for i in range(30)] == [None] * 30
    assert [fb.step(False, 9.0 + i / 10, "Live") for i in range(5)] == [None] * 5  # and again
    assert [fb.step(True, 10.0 + i / 10, "Live") for i in range(20)] == [None] * 20  # recovered: stays
    assert fb.step(False, 15.0, "Live") == "BRB"  # the next outage
    assert fb.step(True, 20.0, "BRB") is None
    assert fb.step(True, 21.0, "BRB") == "Live"


def test_a_failed_switch_is_tried_again_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    scenes = FakeScenes("Live")
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB"), scenes)
    m = monitor_at(0.0)
    switcher.step(m, 0.1)
    scenes.away = True
    with caplog.at_level(logging.INFO, logger="streamnode_obs"):
        for i in range(50):
            assert switcher.step(m, 5.0 + i / 10) is None
        scenes.away = False
        assert switcher.step(m, 10.1) == "BRB"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["streamnode: nothing answers at 127.0.0.1:4455", "streamnode: OBS answers now",
                     "streamnode: switched OBS to the fallback scene 'BRB'"], lines


def test_a_missing_fallback_scene_is_named_at_start_with_the_scenes_that_exist(
        caplog: pytest.LogCaptureFixture) -> None:
    scenes = FakeScenes("Live", names=("Live", "Be right back"))
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB"), scenes, recheck_s=5.0)
    m = monitor_at(0.0)
    with caplog.at_level(logging.INFO, logger="streamnode_obs"):
        for i in range(100):  # 10 s: the node goes away at 3 s
            switcher.step(m, 0.1 + i / 10)
        assert scenes.switches == [] and scenes.scene == "Live"
        scenes.scene_names.append("BRB")  # the operator adds it
        for i in range(60):
            switcher.step(m, 10.1 + i / 10)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0] == (logging.WARNING, "streamnode: OBS has no scene named 'BRB' to fall back to; its "
                        "scenes: 'Live', 'Be right back'. Pick one of them, or add that scene in OBS")
    assert lines[1:] == [(logging.INFO, "streamnode: OBS has the fallback scene 'BRB' now"),
                         (logging.INFO, "streamnode: switched OBS to the fallback scene 'BRB'")], lines
    assert scenes.switches == ["BRB"]


def test_watchdog_against_a_live_node_heartbeat() -> None:
    """The watchdog loop with the node's real heartbeat: stop the node → fallback scene;
    start it again on the same port → back to the live scene."""
    reply_port = free_udp_port()
    n = LiveNode(reply_port=reply_port)
    port = n.port
    scenes = FakeScenes("Live")
    link = core.NodeLink("127.0.0.1", port, reply_port=reply_port)
    session = core.NodeSession(link, core.NodeMonitor(timeout_s=1.0), hello_interval_s=0.1)
    switcher = core.FallbackSwitcher(core.SceneFallback("BRB", recover_s=0.2), scenes)
    stop = threading.Event()
    t = threading.Thread(target=core.watch, args=(session, switcher, stop, 0.02), daemon=True)
    t.start()
    try:
        wait_for(lambda: switcher.fallback.armed)
        n.close()
        wait_for(lambda: scenes.scene == "BRB", timeout=5)
        n = LiveNode(reply_port=reply_port, port=port)
        wait_for(lambda: scenes.scene == "Live")
        assert scenes.switches[-2:] == ["BRB", "Live"]
    finally:
        stop.set()
        t.join(2)
        n.close()
        link.close()


# -- the watchdog program ------------------------------------------------------------------------


def run_watchdog(seconds: float, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`streamnode_watchdog.py` as a user runs it, for `seconds`, then Ctrl+C; (exit code, its log)."""
    proc = subprocess.Popen([sys.executable, str(OBS_DIR / "streamnode_watchdog.py"), *args], cwd=ROOT,
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


def test_watchdog_says_once_that_obs_is_not_there() -> None:
    """With nothing on the obs-websocket port, one line says so, however long it runs; no
    traceback from obsws-python."""
    pytest.importorskip("obsws_python", reason='obsws-python not installed (pip install "streamnode[obs]")')
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        obs_port = closed.getsockname()[1]  # bound, never listening: connections are refused
        code, out = run_watchdog(2.5, "--fallback-scene", "BRB", "--arm-at-start", "--obs-port", str(obs_port),
                                 "--node-port", str(free_udp_port()), "--reply-port", str(free_udp_port()))
    lines = out.strip().splitlines()
    assert code == 0, out
    about_obs = [line for line in lines if "OBS" in line and "watching" not in line]
    assert len(about_obs) == 1 and f"nothing answers at 127.0.0.1:{obs_port}" in about_obs[0], out
    assert "Traceback" not in out and len(lines) <= 4, out


# -- obs-websocket adapter (only what runs without OBS) ------------------------------------------


class StandInObsws:
    """obsws-python's surface as the adapter uses it, answering as obs-websocket 5.1 does:
    an unknown scene is request error 600 on a connection that stays up."""

    class OBSSDKError(Exception):
        pass

    class OBSSDKRequestError(OBSSDKError):
        def __init__(self, req_name: str, code: int, comment: str) -> None:
            self.req_name, self.code = req_name, code
            super().__init__(f"Request {req_name} returned code {code}. With message: {comment}")

    def __init__(self, scene_names: tuple[str, ...] = ("Live", "BRB")) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.scene_names = scene_names
        outer = self

        class Reply:
            def __init__(self, **kw: Any) -> None:
                self.__dict__.update(kw)

        class ReqClient:
            def __init__(self, **kw: Any) -> None:
                outer.calls.append(("connect", kw))
                self.scene = "Live"

            def get_current_program_scene(self) -> Any:
                return Reply(current_program_scene_name=self.scene)  # obs-websocket < 5.5

            def get_scene_list(self) -> Any:
                n = len(outer.scene_names)  # obs-websocket numbers them from the bottom
                return Reply(scenes=[{"sceneName": s, "sceneIndex": n - 1 - i} for i, s in
                                     reversed(list(enumerate(outer.scene_names)))])

            def set_current_program_scene(self, name: str) -> None:
                outer.calls.append(("set", name))
                if name not in outer.scene_names:
                    raise outer.OBSSDKRequestError("SetCurrentProgramScene", 600,
                                                   f"No source was found by the name of `{name}`.")
                self.scene = name

            def disconnect(self) -> None:
                outer.calls.append(("disconnect", None))

        self.module = types.SimpleNamespace(ReqClient=ReqClient)
        self.error_module = types.SimpleNamespace(OBSSDKError=self.OBSSDKError,
                                                  OBSSDKRequestError=self.OBSSDKRequestError)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "obsws_python", self.module)
        monkeypatch.setitem(sys.modules, "obsws_python.error", self.error_module)


def test_obs_websocket_adapter_reads_both_reply_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    obsws = StandInObsws()
    obsws.install(monkeypatch)
    scenes = core.ObsWebsocketScenes("127.0.0.1", 4455, "secret")
    assert scenes.current() == "Live"
    assert scenes.names() == ["Live", "BRB"]  # the dock's order
    scenes.switch("BRB")
    scenes.close()
    scenes.close()
    assert obsws.calls == [("connect", {"host": "127.0.0.1", "port": 4455, "password": "secret", "timeout": 3.0}),
                           ("set", "BRB"), ("disconnect", None)]


def test_a_missing_scene_is_an_answer_not_a_lost_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    obsws = StandInObsws()
    obsws.install(monkeypatch)
    scenes = core.ObsWebsocketScenes("127.0.0.1", 4455, "secret")
    assert scenes.current() == "Live"
    with pytest.raises(LookupError, match="no scene named 'Nope'"):
        scenes.switch("Nope")
    assert scenes.current() == "Live"  # still connected: no retry wait, no reconnect
    assert [c for c, _ in obsws.calls] == ["connect", "set"]


def test_obs_websocket_adapter_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "obsws_python", None)
    with pytest.raises(RuntimeError, match="pip install obsws-python"):
        core.ObsWebsocketScenes()


def test_watchdog_cli_help_and_missing_package(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    watchdog = load_script(OBS_DIR / "streamnode_watchdog.py", "streamnode_watchdog")
    monkeypatch.setitem(sys.modules, "obsws_python", None)
    assert watchdog.main(["--fallback-scene", "BRB"]) == 2
    assert "pip install obsws-python" in capsys.readouterr().err


# -- the OBS script, with a stand-in obspython ----------------------------------------------------


class FakeProp:
    def __init__(self, name: str, description: str) -> None:
        self.name, self.description = name, description
        self.items: list[str] = []


class FakeObs(types.ModuleType):
    """Just enough of obspython for streamnode_obs.py: settings are dicts with defaults, a
    properties view is a dict of named properties with their descriptions, scenes are names,
    timers are kept for the test to call, and script_log lines are kept with their level."""

    LOG_WARNING, LOG_INFO = 200, 300  # obs-module's values

    def __init__(self) -> None:
        super().__init__("obspython")
        self.timers: list[Callable[[], None]] = []
        self.scene_names = ["Live", "BRB", "Interview"]
        self.current = "Live"
        self.log: list[tuple[int, str]] = []

    def __getattr__(self, name: str) -> Any:
        if name.isupper():  # OBS_TEXT_INFO and friends
            return name
        raise AttributeError(name)

    # settings
    def obs_data_set_default_string(self, d: dict, k: str, v: Any) -> None:
        d.setdefault(k, v)

    obs_data_set_default_int = obs_data_set_default_double = obs_data_set_default_bool = obs_data_set_default_string

    def obs_data_get_string(self, d: dict, k: str) -> str:
        return str(d.get(k, ""))

    def obs_data_get_int(self, d: dict, k: str) -> int:
        return int(d.get(k, 0))

    def obs_data_get_double(self, d: dict, k: str) -> float:
        return float(d.get(k, 0.0))

    def obs_data_get_bool(self, d: dict, k: str) -> bool:
        return bool(d.get(k, False))

    def obs_data_set_string(self, d: dict, k: str, v: str) -> None:
        d[k] = v

    # properties
    def obs_properties_create(self) -> dict:
        return {}

    def _add(self, props: dict, name: str, description: str, *rest: Any) -> FakeProp:
        props[name] = FakeProp(name, description)
        return props[name]

    obs_properties_add_text = obs_properties_add_button = obs_properties_add_float_slider = _add
    obs_properties_add_int = obs_properties_add_list = obs_properties_add_bool = _add

    def obs_properties_add_group(self, props: dict, name: str, description: str, kind: Any, group: dict) -> FakeProp:
        props.update(group)  # OBS finds a group's properties by name from the top too
        return self._add(props, name, description)

    def obs_properties_get(self, props: dict, name: str) -> FakeProp | None:
        return props.get(name)

    def obs_property_set_description(self, prop: FakeProp, text: str) -> None:
        prop.description = text

    def obs_property_set_long_description(self, prop: FakeProp, text: str) -> None:
        pass

    def obs_property_list_add_string(self, prop: FakeProp, name: str, value: str) -> None:
        prop.items.append(value)

    # timers and log
    def timer_add(self, cb: Callable[[], None], ms: int) -> None:
        self.timers.append(cb)

    def timer_remove(self, cb: Callable[[], None]) -> None:
        self.timers.remove(cb)

    def script_log(self, level: int, text: str) -> None:
        self.log.append((level, text))

    def lines(self, containing: str = "") -> list[str]:
        return [text for _, text in self.log if containing in text]

    # scenes
    def obs_frontend_get_current_scene(self) -> str:
        return self.current

    def obs_frontend_get_scenes(self) -> list[str]:
        return list(self.scene_names)

    def obs_source_get_name(self, s: str) -> str:
        return s

    def obs_source_release(self, s: str) -> None:
        pass

    def source_list_release(self, scenes: list[str]) -> None:
        pass

    def obs_frontend_set_current_scene(self, s: str) -> None:
        self.current = s


class ScriptClock:
    """The script's clock, real time plus a jump the test controls (`script.time` is replaced)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class Script:
    """streamnode_obs.py loaded as OBS loads it, with its settings, timer and clock at hand."""

    def __init__(self, fake: FakeObs, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
        self.fake, self.settings = fake, settings
        self.module = load_script(OBS_DIR / "streamnode_obs.py", "streamnode_obs_script")
        self.clock = ScriptClock()
        monkeypatch.setattr(self.module, "time", self.clock)
        self.module.script_defaults(settings)
        self.props = self.module.script_properties()
        self.module.script_load(settings)
        self.module.script_update(settings)

    @property
    def s(self) -> Any:
        return self.module._s

    def tick(self) -> None:
        self.fake.timers[0]()

    def ticks_until(self, check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
        return wait_for(lambda: (self.tick(), check())[1], timeout=timeout, what=what)

    def update(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.module.script_update(self.settings)

    def close(self) -> None:
        if self.s.session is not None:
            self.module.script_unload()


@pytest.fixture
def fake_obs(monkeypatch: pytest.MonkeyPatch) -> FakeObs:
    fake = FakeObs()
    monkeypatch.setitem(sys.modules, "obspython", fake)
    return fake


@contextlib.contextmanager
def script_with_node(fake: FakeObs, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Iterator[tuple[Script, Any]]:
    reply_port = free_udp_port()
    node = LiveNode(reply_port=reply_port)
    script = None
    try:
        script = Script(fake, {"node_port": node.port, "reply_port": reply_port, **settings}, monkeypatch)
        script.s.outbox.text_delay_s = 0.0
        script.s.session.monitor.timeout_s = 1.0
        yield script, node
    finally:
        if script is not None:
            script.close()
        node.close()


def test_obs_script_end_to_end_with_a_stand_in_obs(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    with script_with_node(fake_obs, monkeypatch) as (script, n):
        script.update(guidance=2.5)  # the user moves the slider
        script.tick()
        wait_for(lambda: n.value("guidance_scale") == pytest.approx(2.5))
        script.update(prompt="a neon city")
        script.tick()
        wait_for(lambda: n.value("prompt") == "a neon city")
        assert n.value("seed") is None  # untouched values are not sent

        script.ticks_until(lambda: script.settings.get("status", "").startswith("streaming"))

        script.s.fallback_settings.delay_s = 0.0  # no typing to wait for here
        script.update(fallback_enabled=True, fallback_scene="BRB")
        script.tick()
        script.s.switcher.fallback.recover_s = 0.1
        script.tick()
        port = n.port
        n.close()
        script.ticks_until(lambda: fake_obs.current == "BRB")
        assert script.settings["status"].startswith("node silent")
        n = LiveNode(reply_port=script.settings["reply_port"], port=port)
        try:
            script.ticks_until(lambda: fake_obs.current == "Live")
        finally:
            n.close()
        assert fake_obs.lines("node streaming")
        script.module.script_unload()
        assert fake_obs.timers == []


def test_obs_script_says_routine_news_at_info(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    """OBS opens the Script Log window over everything for each warning: node lost and node
    back are info; only a problem to fix (here: a fallback scene OBS lacks) warns, once."""
    with script_with_node(fake_obs, monkeypatch, fallback_enabled=True, fallback_scene="BRB") as (script, n):
        script.ticks_until(lambda: script.settings.get("status", "").startswith("streaming"))
        script.tick()  # the fallback arms
        port = n.port
        n.close()
        script.ticks_until(lambda: fake_obs.current == "BRB")
        n = LiveNode(reply_port=script.settings["reply_port"], port=port)
        try:
            script.ticks_until(lambda: fake_obs.current == "Live")
        finally:
            n.close()
        assert len(fake_obs.lines("switched OBS")) == 2
        assert [text for level, text in fake_obs.log if level == fake_obs.LOG_WARNING] == []
        script.update(fallback_scene="Be right back")  # not a scene of this OBS
        for _ in range(20):
            script.clock.offset += 0.1
            script.tick()
        warnings = [text for level, text in fake_obs.log if level == fake_obs.LOG_WARNING]
        assert warnings == ["streamnode: OBS has no scene named 'Be right back' to fall back to; its scenes: "
                            "'Live', 'BRB', 'Interview'. Pick one of them, or add that scene in OBS"]


def test_obs_script_logs_silence_once(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    with script_with_node(fake_obs, monkeypatch) as (script, n):
        script.ticks_until(lambda: script.settings.get("status", "").startswith("streaming"))
        n.close()
        labels = set()
        for _ in range(8):  # 8 s of silence, a tick a second
            script.clock.offset += 1.0
            script.tick()
            labels.add(script.settings["status"])
        assert len(labels) == 8  # the label counts the seconds
        assert len(fake_obs.lines("silent")) == 1, fake_obs.lines()


def test_obs_script_reload_logs_each_line_once(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"node_port": free_udp_port(), "reply_port": free_udp_port()}
    first = Script(fake_obs, dict(settings), monkeypatch)
    first.close()  # OBS: Scripts → Reload: script_unload, the file runs again, script_load
    again = Script(fake_obs, dict(settings), monkeypatch)
    try:
        fake_obs.log.clear()
        again.update(guidance=99.0)  # out of range: one warning line
        assert fake_obs.lines() == ["streamnode: guidance not sent: Guidance: 99.0 is outside 0..20"]
    finally:
        again.close()
    assert not [h for h in logging.getLogger("streamnode_obs").handlers if h.get_name()]


def test_obs_script_refresh_shows_the_status_once(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    with script_with_node(fake_obs, monkeypatch) as (script, n):
        script.ticks_until(lambda: script.settings.get("status", "").startswith("streaming"))
        assert script.module._on_refresh(script.props, script.props["refresh"]) is True  # redraw
        label = f"{script.props['status'].description} {script.settings['status']}"
        summary = script.s.session.monitor.summary(script.clock.monotonic())
        assert summary.startswith("streaming") and label.count(summary) == 1, label


def test_obs_script_connects_once_a_typed_port_is_complete(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    with script_with_node(fake_obs, monkeypatch) as (script, n):
        script.ticks_until(lambda: script.settings.get("status", "").startswith("streaming"))
        new_port = free_udp_port()
        fake_obs.log.clear()
        for i in range(1, len(str(new_port)) + 1):  # typed digit by digit, a keystroke each 0.2 s
            script.update(reply_port=int(str(new_port)[:i]))
            script.tick()
            script.clock.offset += 0.2
        script.clock.offset += 1.0
        script.tick()
        assert fake_obs.lines("sending to") == [f"streamnode: sending to 127.0.0.1:{n.port}, replies on port {new_port}"]
        assert script.s.session.link.port == new_port


def test_obs_script_send_all_ends_with_the_panels_values(fake_obs: FakeObs, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Send all values now" with a preset in the panel, against the real node program: the
    node ends with the panel's prompt and guidance, not the preset's. Twice: with a preset the
    node has not loaded yet (it would drop the repeated prompt unless the preset is applied
    first), and right after the panel loaded it."""
    reply_port = free_udp_port()
    with real_node(reply_port) as port:
        script = Script(fake_obs, {"node_port": port, "reply_port": reply_port, "preset": "demo"}, monkeypatch)
        monitor = script.s.session.monitor

        def node_values() -> tuple[Any, Any]:
            monitor.applied.clear()
            script.s.session.send("/status")  # the node's full status: its live values
            script.ticks_until(lambda: "/guidance" in monitor.applied and "/prompt" in monitor.applied)
            end = time.monotonic() + 0.3
            while time.monotonic() < end:  # the rest of the reply, so the next one starts clean
                script.tick()
                time.sleep(0.02)
            return monitor.applied["/prompt"], monitor.applied["/guidance"]

        def send_all() -> None:
            monitor.applied.clear()
            script.module._on_send_all(script.props, script.props["send_all"])
            script.ticks_until(lambda: "/prompt" in monitor.applied,
                               what="the node to apply the panel's prompt (dropped as a repeat?)")
            time.sleep(0.3)  # and whatever came with it

        try:
            script.ticks_until(lambda: monitor.state == "streaming", timeout=30)
            # The user edits the panel: each value goes to the node on its own.
            script.update(prompt="a paper lantern festival", guidance=2.0)
            script.ticks_until(lambda: monitor.applied.get("/prompt") == "a paper lantern festival"
                               and monitor.applied.get("/guidance") == pytest.approx(2.0))
            send_all()
            assert node_values() == ("a paper lantern festival", pytest.approx(2.0))
            script.update(preset="sd-turbo")
            script.update(preset="demo")  # picked again: the node loads the preset's prompt and guidance
            wait_for(lambda: node_values() == ("a watercolour city at dusk", pytest.approx(1.0)))
            send_all()
            assert node_values() == ("a paper lantern festival", pytest.approx(2.0))
        finally:
            script.close()


@contextlib.contextmanager
def real_node(reply_port: int) -> Iterator[int]:
    """`streamnode run` (no model: the passthrough engine) with OSC on a free loopback port."""
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamnode.cli", "run", "--engine", "passthrough", "--source", "test://moving",
         "--sink", "null://", "--width", "64", "--height", "64", "--osc-port", str(port),
         "--set", f"osc.reply_port={reply_port}", "--log-level", "warning"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
