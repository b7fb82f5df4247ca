"""The OBS kit (obs/): its OSC core against the node's real OSC server, the heartbeat watchdog,
and the OBS script itself driven through a stand-in `obspython` module.

What cannot run here: OBS itself (the real obspython API, the properties UI, scene switching
through the frontend) and obs-websocket against a real OBS; obs/README.md says so.
"""

from __future__ import annotations

import socket
import struct
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
from support import free_udp_port, load_script, wait_for

import streamnode.control.osc as osc_mod
from streamnode.config import OscConfig
from streamnode.control.osc import ADDRESSES, OscServer
from streamnode.control.updates import ControlQueue, Update

ROOT = Path(__file__).resolve().parent.parent
OBS_DIR = ROOT / "obs"


core = load_script(OBS_DIR / "streamnode_obs_core.py", "streamnode_obs_core")


class LiveNode:
    """The node's real OSC server with a stand-in engine thread that applies every update."""

    def __init__(self, reply_port: int, port: int = 0, prefix: str = "", state: str = "streaming") -> None:
        self.queue = ControlQueue()
        self.state = state
        self.applied: list[Update] = []
        self.server = OscServer(OscConfig(port=port, reply_port=reply_port, prefix=prefix), self.queue, self.status)
        self.server.start()
        self.port = self.server.port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._engine, name="kit-test-engine", daemon=True)
        self._thread.start()

    def _engine(self) -> None:
        while not self._stop.wait(0.005):
            for u in self.queue.drain():
                self.applied.append(u)
                self.queue.applied(u)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "fps_out": 24.0, "latency_ms_p50": 50.0, "dropped": 1, "skipped": 2,
                "error": ""}

    def value(self, key: str) -> Any:
        return next((u.value for u in reversed(self.applied) if u.key == key), None)

    def close(self) -> None:
        self.server.stop()
        self._stop.set()
        self._thread.join(2)


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
    ("/prompt/blend", ["a", 0.5, "bb", 0.5]),
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
    outbox = core.Outbox(text_delay_s=0.0)
    values = {"prompt": "a neon city", "negative_prompt": "blurry", "guidance": 1.5, "strength": 0.4,
              "seed": 123, "preset": "demo"}
    outbox.update(values, now=0.0)
    sent = outbox.due(now=1.0)
    assert [a for a, _ in sent] == ["/prompt", "/negative_prompt", "/guidance", "/strength", "/seed", "/preset"]
    for address, args in sent:
        assert link.send(address, *args)
    wait_for(lambda: node.value("preset") == "demo")
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
        return m.heartbeat is not None and m.fps is not None and "/guidance" in m.applied

    wait_for(seen)
    m = session.monitor
    assert m.state == "streaming" and m.healthy(time.monotonic())
    assert m.fps == 24.0 and m.latency_ms == 50.0 and m.dropped == 1 and m.skipped == 2
    assert m.applied["/guidance"] == pytest.approx(2.0)
    assert m.summary(time.monotonic()).startswith("streaming · 24.0 fps · 50 ms")


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


# -- the fallback logic --------------------------------------------------------------------------


class FakeScenes:
    def __init__(self, current: str = "Live") -> None:
        self.scene = current
        self.switches: list[str] = []
        self.fail = False

    def current(self) -> str | None:
        return self.scene

    def switch(self, name: str) -> None:
        if self.fail:
            raise ConnectionError("OBS went away")
        self.switches.append(name)
        self.scene = name


def monitor_at(healthy_until: float | None, state: str = "streaming") -> Any:
    m = core.NodeMonitor(timeout_s=3.0)
    if healthy_until is not None:
        m.on_message("/streamnode/state", [state], healthy_until)
        m.on_message("/streamnode/heartbeat", [1], healthy_until)
    return m


def test_fallback_arms_only_after_the_node_was_seen() -> None:
    fb, scenes = core.SceneFallback("BRB"), FakeScenes()
    assert core.fallback_tick(fb, monitor_at(None), scenes, 100.0) is None  # never seen: do nothing
    armed = core.SceneFallback("BRB", arm_at_start=True)
    assert core.fallback_tick(armed, monitor_at(None), scenes, 100.0) == "BRB"


def test_fallback_cuts_after_the_timeout_and_back_after_recovery() -> None:
    fb, scenes = core.SceneFallback("BRB", recover_s=2.0), FakeScenes("Live")
    m = monitor_at(0.0)
    assert core.fallback_tick(fb, m, scenes, 1.0) is None and fb.armed
    assert core.fallback_tick(fb, m, scenes, 2.9) is None  # 2.9 s since the last beat: still fine
    assert core.fallback_tick(fb, m, scenes, 3.5) == "BRB"
    assert core.fallback_tick(fb, m, scenes, 4.0) is None  # stays, no repeated switching
    for t in (10.0, 11.0):
        m.on_message("/streamnode/heartbeat", [2], t)
        assert core.fallback_tick(fb, m, scenes, t) is None  # healthy, but not for 2 s yet
    m.on_message("/streamnode/heartbeat", [3], 12.0)
    assert core.fallback_tick(fb, m, scenes, 12.0) == "Live"
    assert scenes.switches == ["BRB", "Live"]


def test_fallback_on_error_state_and_warmup() -> None:
    fb, scenes = core.SceneFallback("BRB"), FakeScenes("Live")
    m = monitor_at(0.0)
    core.fallback_tick(fb, m, scenes, 0.5)
    m.on_message("/streamnode/state", ["error"], 1.0)
    m.on_message("/streamnode/heartbeat", [2], 1.0)
    assert core.fallback_tick(fb, m, scenes, 1.0) == "BRB"  # beating, but broken
    m.on_message("/streamnode/state", ["warming_up"], 5.0)
    m.on_message("/streamnode/heartbeat", [1], 5.0)
    assert core.fallback_tick(fb, m, scenes, 8.0) is None  # warming up: not worth showing yet


def test_the_operator_wins_over_the_fallback() -> None:
    fb, scenes = core.SceneFallback("BRB", recover_s=0.0), FakeScenes("Live")
    m = monitor_at(0.0)
    core.fallback_tick(fb, m, scenes, 0.1)
    assert core.fallback_tick(fb, m, scenes, 5.0) == "BRB"
    scenes.scene = "Interview"  # the operator cut elsewhere during the outage
    m.on_message("/streamnode/heartbeat", [5], 9.0)
    assert core.fallback_tick(fb, m, scenes, 9.0) is None
    assert core.fallback_tick(fb, m, scenes, 12.0) is None
    assert scenes.scene == "Interview"


def test_a_failed_switch_is_tried_again() -> None:
    fb, scenes = core.SceneFallback("BRB"), FakeScenes("Live")
    m = monitor_at(0.0)
    core.fallback_tick(fb, m, scenes, 0.1)
    scenes.fail = True
    assert core.fallback_tick(fb, m, scenes, 5.0) is None
    scenes.fail = False
    assert core.fallback_tick(fb, m, scenes, 5.1) == "BRB"


def test_watchdog_against_a_live_node_heartbeat() -> None:
    """The watchdog loop with the node's real heartbeat: stop the node → fallback scene;
    start it again on the same port → back to the live scene."""
    reply_port = free_udp_port()
    n = LiveNode(reply_port=reply_port)
    port = n.port
    scenes = FakeScenes("Live")
    link = core.NodeLink("127.0.0.1", port, reply_port=reply_port)
    session = core.NodeSession(link, core.NodeMonitor(timeout_s=1.0), hello_interval_s=0.1)
    fallback = core.SceneFallback("BRB", recover_s=0.2)
    stop = threading.Event()
    t = threading.Thread(target=core.watch, args=(session, fallback, scenes, stop, 0.02), daemon=True)
    t.start()
    try:
        wait_for(lambda: fallback.armed)
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


# -- obs-websocket adapter (only what runs without OBS) ------------------------------------------


def test_obs_websocket_adapter_reads_both_reply_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class Reply:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    class ReqClient:
        def __init__(self, **kw: Any) -> None:
            calls.append(("connect", kw))
            self.scene = "Live"

        def get_current_program_scene(self) -> Any:
            return Reply(current_program_scene_name=self.scene)  # obs-websocket < 5.5

        def set_current_program_scene(self, name: str) -> None:
            calls.append(("set", name))

        def disconnect(self) -> None:
            calls.append(("disconnect", None))

    monkeypatch.setitem(sys.modules, "obsws_python", types.SimpleNamespace(ReqClient=ReqClient))
    scenes = core.ObsWebsocketScenes("127.0.0.1", 4455, "secret")
    assert scenes.current() == "Live"
    scenes.switch("BRB")
    scenes.close()
    scenes.close()
    assert calls == [("connect", {"host": "127.0.0.1", "port": 4455, "password": "secret", "timeout": 3.0}),
                     ("set", "BRB"), ("disconnect", None)]


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


class FakeObs(types.ModuleType):
    """Just enough of obspython for streamnode_obs.py: settings are dicts with defaults, scenes
    are names, timers are kept for the test to call."""

    LOG_INFO, LOG_WARNING = 300, 200

    def __init__(self) -> None:
        super().__init__("obspython")
        self.timers: list[Callable[[], None]] = []
        self.scene_names = ["Live", "BRB"]
        self.current = "Live"
        self.log: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.isupper():  # OBS_TEXT_INFO and friends
            return name
        if name.startswith(("obs_properties_", "obs_property_")):
            return lambda *a, **k: object()
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

    # timers and log
    def timer_add(self, cb: Callable[[], None], ms: int) -> None:
        self.timers.append(cb)

    def timer_remove(self, cb: Callable[[], None]) -> None:
        self.timers.remove(cb)

    def script_log(self, level: int, text: str) -> None:
        self.log.append(text)

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


def test_obs_script_end_to_end_with_a_stand_in_obs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeObs()
    monkeypatch.setitem(sys.modules, "obspython", fake)
    script = load_script(OBS_DIR / "streamnode_obs.py", "streamnode_obs_script")
    reply_port = free_udp_port()
    n = LiveNode(reply_port=reply_port)
    settings: dict[str, Any] = {"node_port": n.port, "reply_port": reply_port}
    try:
        script.script_defaults(settings)
        assert script.script_properties() is not None
        script.script_load(settings)
        script.script_update(settings)
        tick = fake.timers[0]
        script._s.outbox.text_delay_s = 0.0
        script._s.session.monitor.timeout_s = 1.0

        settings["guidance"] = 2.5  # the user moves the slider
        script.script_update(settings)
        tick()
        wait_for(lambda: n.value("guidance_scale") == pytest.approx(2.5))
        settings["prompt"] = "a neon city"
        script.script_update(settings)
        tick()
        wait_for(lambda: n.value("prompt") == "a neon city")
        assert n.value("seed") is None  # untouched values are not sent

        wait_for(lambda: (tick(), settings.get("status", "").startswith("streaming"))[1])

        settings.update(fallback_enabled=True, fallback_scene="BRB")
        script.script_update(settings)
        script._s.fallback.recover_s = 0.1
        tick()
        n.close()
        wait_for(lambda: (tick(), fake.current == "BRB")[1], timeout=5)
        assert settings["status"].startswith("node silent")
        n = LiveNode(reply_port=reply_port, port=settings["node_port"])
        wait_for(lambda: (tick(), fake.current == "Live")[1])
        assert any("streaming" in line for line in fake.log)
        script.script_unload()
        assert fake.timers == []
    finally:
        n.close()
        if script._s.session is not None:
            script._s.session.close()
