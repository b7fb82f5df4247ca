"""OSC server over real UDP on 127.0.0.1: every address, coercion, dedupe, triggers, prefix,
allow-list, rejections, bundles, heartbeat and status replies.

The server runs inside a real node with the real engine on the tiny model, so what a surface
sees (the applied echo) is checked against what the engine really uses (its live state).
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from support import Surface, applied_addr, message, small_config, tiny_factory, wait_for

from streamnode.config import OscConfig
from streamnode.control.osc import ADDRESSES, OscServer, OscStartError, lookup, value_at
from streamnode.control.updates import ControlQueue, Update
from streamnode.live_params import LiveParams, LiveState
from streamnode.node import Node

# -- harness ------------------------------------------------------------------------------


def bundle(*elements: bytes) -> bytes:
    out = b"#bundle\x00" + struct.pack(">Q", 1)
    for e in elements:
        out += struct.pack(">i", len(e)) + e
    return out


class Rig:
    """A real node (the tiny model at 64×64) with its OSC server, and a surface on loopback.

    `applied` lists the updates the node reported applied, `failed` the ones it refused, both
    from the node's own report (ControlQueue.on_report), not from a copy of its loop."""

    def __init__(self, components: Any, surface_host: str = "127.0.0.1", **osc: Any) -> None:
        self.surface = Surface(surface_host)
        overrides = {"osc.enabled": True, "osc.port": 0, "osc.reply_port": self.surface.port}
        overrides.update({f"osc.{k}": v for k, v in osc.items()})
        self.node = Node(small_config(**overrides), engine_factory=tiny_factory(components))
        self.applied: list[Update] = []
        self.failed: list[tuple[Update, str]] = []
        self.node.queue.on_report(self._report)
        self.node.start()
        wait_for(lambda: self.node.status()["state"] == "streaming", timeout=30, what="the node streaming")
        self.server = self.node._osc
        self.queue = self.node.queue
        self.surface.node = ("127.0.0.1", self.node.osc_port)

    def _report(self, update: Update, error: str | None) -> None:
        if error is None:
            self.applied.append(update)
        else:
            self.failed.append((update, error))

    def live(self) -> LiveState:
        return self.node.live()

    def value(self, address: str) -> Any:
        found = lookup(address, 8)
        assert found is not None
        return value_at(self.live(), *found)

    def wait_applied(self, key: str, timeout: float = 5.0) -> Update:
        return wait_for(lambda: next((u for u in self.applied if u.key == key), None), timeout, f"{key} applied")

    def close(self) -> None:
        self.node.stop()
        self.surface.close()


@pytest.fixture
def rig(components):  # noqa: ANN001, ANN201
    r = Rig(components)
    yield r
    r.close()


def plain(value: Any) -> Any:
    """Tuples → lists, all the way down (the live state holds tuples; OSC sends lists)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# -- each address changes what the engine uses --------------------------------------------

CASES = [
    # address, args, expected value in force, expected echo params
    ("/prompt", ["a cat"], "a cat", ["a cat"]),
    ("/negative_prompt", ["blurry"], "blurry", ["blurry"]),
    ("/prompt_blend", ["a cat", 0.25, "a dog", 0.75], [["a cat", 0.25], ["a dog", 0.75]],
     ["a cat", 0.25, "a dog", 0.75]),
    ("/blend_method", ["slerp"], "slerp", ["slerp"]),
    ("/prompt_transition", [12.0], 12, [12]),
    ("/guidance", [3.5], 3.5, [3.5]),
    ("/delta", [0.5], 0.5, [0.5]),
    ("/strength", [0.6], 0.6, [pytest.approx(0.6)]),
    ("/t_index", [20, 35, 45], [20, 35, 45], [20, 35, 45]),
    ("/seed", [1234], 1234, [1234]),
    ("/seed_blend", [1, 0.5, 7, 0.5], [[1, 0.5], [7, 0.5]], [1, 0.5, 7, 0.5]),
    ("/similarity", [0.9], 0.9, [pytest.approx(0.9)]),
    ("/similarity_max_skip", [3], 3, [3]),
    ("/feature_bank", [1], True, [1]),
    ("/feature_bank_size", [2], 2, [2]),
    ("/feature_bank_interval", [8.0], 8, [8]),
    ("/feature_fusion", [0.5], 0.5, [0.5]),
    ("/feature_fusion_threshold", [0.9], 0.9, [pytest.approx(0.9)]),
    ("/smoothing", [0.5], 0.5, [0.5]),
    ("/smoothing_motion", [0], False, [0]),
    ("/pause", [1], True, [1]),
    ("/bypass", [1.0], True, [1]),
    ("/preset", ["demo"], "demo", ["demo"]),
    ("/bpm", [128.0], 128.0, [128.0]),
    ("/quantize", ["bar"], "bar", ["bar"]),
    ("/cue_every", [2], 2, [2]),
    ("/midi/learn", ["/guidance"], "/guidance", ["/guidance"]),
]


@pytest.mark.parametrize(("address", "args", "value", "echo"), CASES, ids=[c[0] for c in CASES])
def test_address_reaches_engine_and_is_echoed(rig: Rig, address, args, value, echo) -> None:
    rig.surface.send(address, *args)
    # Matched by value: the echo of a change the node made on its own just before (its first
    # live state after the start, e.g. /t_index [35]) may be in the inbox first.
    assert rig.surface.wait_for(applied_addr(address), where=lambda params: params == echo) == echo
    (param, _) = lookup(address, 8)
    u = rig.wait_applied(param.key)
    assert u.origin == address
    assert plain(rig.value(address)) == (pytest.approx(value) if isinstance(value, float) else value)


def test_every_input_address_is_covered_by_a_case() -> None:
    covered = {c[0] for c in CASES} | {"/status", "/model", "/brush/order", "/cue", "/cue_next", "/downbeat"}
    assert {p.address for p in ADDRESSES if not p.group} == covered


def test_tempo_addresses_step_cues_hold_one_change_for_its_beat_and_refuse_a_bad_grid(rig: Rig) -> None:
    s = rig.surface
    s.send("/cues/0/prompt", "a red fox")
    s.send("/cues/3/prompt", "a blue owl")
    s.send("/cue", 3)
    assert s.wait_for(applied_addr("/cue")) == [3]
    assert rig.live().params.prompt == "a blue owl"
    s.send("/cue_next")
    wait_for(lambda: rig.live().node.cue == 0, 5.0, "the next cue, wrapping")
    assert rig.live().params.prompt == "a red fox"
    s.send("/downbeat")
    rig.wait_applied("downbeat")
    bar, beat, bpm = s.wait_for("/streamnode/beat", timeout=2.0)  # a beat every 0.5 s at 120 bpm
    assert 0 <= beat < 4 and bar >= 0 and bpm == pytest.approx(120.0)
    assert rig.node.status()["tempo"]["source"] == "internal"
    beat_s = 60.0 / rig.live().node.bpm
    t_sent = time.monotonic()
    s.send("/at/beat/guidance", 4.0)
    assert s.wait_for(applied_addr("/guidance"), timeout=5.0) == [4.0]
    waited = time.monotonic() - t_sent
    assert waited < beat_s + 1.0  # within its beat (plus a busy machine's slack), not lost
    s.send("/at/someday/guidance", 5.0)
    assert "use /at/<grid>/<address>" in s.wait_for("/streamnode/error")[0]


def test_brush_addresses_paint_the_engine_s_brushes(rig: Rig, tmp_path: Path) -> None:
    png = tmp_path / "mask.png"
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    cv2.imwrite(str(png), mask)
    sends = [
        ("/brush/2/prompt", ["a red hat"], "prompt", "a red hat"),
        ("/brush/2/negative_prompt", ["blue"], "negative_prompt", "blue"),
        ("/brush/2/strength", [0.5], "mask_strength", 0.5),
        ("/brush/2/prompt_strength", [0.8], "prompt_strength", 0.8),
        ("/brush/2/blur", [4], "mask_blur", 4.0),
        ("/brush/2/enabled", [0], "enabled", False),
        ("/brush/2/rect", [0.1, 0.2, 0.5, 0.5], "rect", (0.1, 0.2, 0.5, 0.5)),
        ("/brush/2/circle", [0.5, 0.5, 0.25], "circle", (0.5, 0.5, 0.25)),
        ("/brush/2/mask", [str(png)], "mask", str(png)),
        ("/brush/2/shm", ["shm://masks?plane=1"], "shm", "shm://masks?plane=1"),
    ]
    for address, args, field, value in sends:
        rig.surface.send(address, *args)
        # Creating the brush echoes all its fields: wait for the one just sent.
        expected = args if isinstance(args[0], str) else pytest.approx(args)
        rig.surface.wait_for(applied_addr(address), where=lambda p, e=expected: p == e)
        got = getattr(rig.live().brushes[2].params, field)
        assert got == (pytest.approx(value) if not isinstance(value, str) else value), address
    rig.surface.send("/brush/2/clear")
    rig.surface.wait_for(applied_addr("/brush/2/clear"))
    assert 2 not in rig.live().brushes
    # N beyond max_brushes (8), a missing file, a non-PNG mask, a channel that is no shm:// URI,
    # an order naming a brush twice, an order of brushes that do not exist.
    rig.surface.send("/brush/8/prompt", "x")
    rig.surface.send("/brush/0/mask", str(tmp_path / "nope.png"))
    rig.surface.send("/brush/0/mask", "/etc/passwd")
    rig.surface.send("/brush/0/shm", "masks")
    rig.surface.send("/brush/order", 1, 0, 1)
    rig.surface.send("/brush/order", 1, 0)
    errors = rig.surface.errors(1.0)
    assert len(errors) == 6, errors
    assert "unknown address" in errors[0] and "/brush/0 to /brush/7" in errors[0]
    assert "not an existing .png" in errors[1] and "not an existing .png" in errors[2]
    assert "shm://NAME" in errors[3]
    assert "each brush once" in errors[4]
    assert "brush_order" in errors[5]  # the engine's refusal, reported back


def test_the_brush_order_reaches_the_engine(rig: Rig) -> None:
    for n in (0, 1, 2):
        rig.surface.send(f"/brush/{n}/rect", 0.1 * n, 0.0, 0.5, 0.5)
        rig.surface.wait_for(applied_addr(f"/brush/{n}/rect"))
    rig.surface.send("/brush/order", 2, 0, 1)
    rig.surface.wait_for(applied_addr("/brush/order"), where=lambda p: p == [2, 0, 1])
    assert rig.live().brush_order == (2, 0, 1)
    assert rig.node.engine.regions.order == (2, 0, 1)


def test_numbers_coerce_between_int_and_float(rig: Rig) -> None:
    rig.surface.send("/guidance", 3, types="i")  # an int where a float is declared
    rig.surface.send("/similarity_max_skip", 5.0, types="f")  # a CHOP float where an int is declared
    rig.surface.send("/seed", 3_000_000_000, types="h")  # int64 above the int32 range
    rig.surface.send("/pause", True, types="T")
    assert rig.surface.wait_for(applied_addr("/guidance")) == [3.0]
    assert rig.surface.wait_for(applied_addr("/similarity_max_skip")) == [5]
    assert rig.surface.wait_for(applied_addr("/seed")) == [3_000_000_000]
    rig.surface.wait_for(applied_addr("/pause"))
    params = rig.live().params
    assert params.guidance_scale == 3.0 and isinstance(params.guidance_scale, float)
    assert params.seed == 3_000_000_000 and rig.live().node.pause is True
    # A 32-bit float 1.3 arrives as 1.2999999523; the engine gets the 1.3 that was meant.
    rig.surface.send("/guidance", 1.3)
    rig.surface.wait_for(applied_addr("/guidance"))
    assert rig.live().params.guidance_scale == 1.3


# -- dedupe and triggers ------------------------------------------------------------------


def test_repeated_values_are_dropped_before_the_queue(rig: Rig) -> None:
    for _ in range(200):  # a CHOP sending the same channel every cook
        rig.surface.send("/guidance", 2.0)
    rig.surface.send("/guidance", 2, types="i")  # same value, other type: still a repeat
    rig.surface.send("/delta", 0.7)  # a marker: when it is applied, the 200 have been handled
    rig.surface.wait_for(applied_addr("/delta"))
    time.sleep(0.05)
    assert [u.value for u in rig.applied if u.key == "guidance_scale"] == [2.0]
    assert rig.server.stats()["deduped"] == 200
    rig.surface.send("/guidance", 2.5)  # a new value goes through
    rig.surface.wait_for(applied_addr("/guidance"), where=lambda p: p == [2.5])


def test_a_value_equal_to_the_one_in_force_is_a_repeat(rig: Rig) -> None:
    default = LiveParams().delta
    rig.surface.send("/delta", default)  # what the engine already uses: nothing to do
    rig.surface.send("/seed", 5)
    rig.surface.wait_for(applied_addr("/seed"))
    assert [u.key for u in rig.applied] == ["seed"]


def test_dedupe_follows_the_value_in_force_whoever_changed_it(rig: Rig) -> None:
    rig.surface.send("/prompt", "a cat")
    rig.surface.wait_for(applied_addr("/prompt"))
    rig.queue.put(Update("prompt", "a dog", origin="cli"))  # e.g. the CLI, a preset, a model switch
    rig.surface.wait_for(applied_addr("/prompt"), where=lambda p: p == ["a dog"])
    rig.surface.send("/prompt", "a cat")  # equal to the last OSC value, but not to the engine's
    rig.surface.wait_for(applied_addr("/prompt"), where=lambda p: p == ["a cat"])
    assert rig.live().params.prompt == "a cat"


def test_a_repeated_preset_applies_once_until_something_else_changes(rig: Rig) -> None:
    rig.surface.send("/guidance", 3.0)
    rig.surface.wait_for(applied_addr("/guidance"))
    rig.surface.send("/preset", "demo")
    rig.surface.wait_for(applied_addr("/preset"))
    for _ in range(5):  # an OSC Out DAT repeating it
        rig.surface.send("/preset", "demo")
    rig.surface.send("/guidance", 3.0)  # the preset changed guidance: goes through again
    rig.surface.wait_for(applied_addr("/guidance"), where=lambda p: p == [3.0])
    assert rig.live().node.preset == ""  # no longer the preset's look
    rig.surface.send("/preset", "demo")  # after touching something else: re-applies
    rig.surface.wait_for(applied_addr("/preset"))
    assert [u.key for u in rig.applied] == ["guidance_scale", "preset", "guidance_scale", "preset"]


def test_prompt_and_blend_replace_each_other(rig: Rig) -> None:
    rig.surface.send("/prompt", "a cat")
    rig.surface.wait_for(applied_addr("/prompt"))
    rig.surface.send("/prompt_blend", "a dog", 1.0)
    rig.surface.wait_for(applied_addr("/prompt_blend"))
    assert rig.live().params.prompt is None  # the blend is in force
    rig.surface.send("/prompt", "a cat")  # back to the cat: must not be taken for a repeat
    rig.surface.wait_for(applied_addr("/prompt"))
    assert [u.key for u in rig.applied] == ["prompt", "prompt_blend", "prompt"]
    assert rig.live().params.prompt_blend is None


def test_status_fires_on_the_rising_edge_only(rig: Rig) -> None:
    def state_replies() -> int:
        rig.surface.collect(0.3)
        n = sum(1 for a, p in rig.surface.inbox if a == applied_addr("/guidance"))
        rig.surface.inbox.clear()
        return n

    rig.surface.send("/status", 1)
    assert state_replies() == 1  # the full reply carries every current value, /guidance among them
    rig.surface.send("/status", 1)  # 1 → 1: nothing
    rig.surface.send("/status", 1.0, types="f")
    assert state_replies() == 0
    rig.surface.send("/status", 0)
    rig.surface.send("/status", 1)  # 0 → 1: fires
    assert state_replies() == 1
    rig.surface.send("/status")  # no argument: fires every time
    rig.surface.send("/status")
    assert state_replies() == 2


def test_brush_clear_is_a_rising_edge_trigger(rig: Rig) -> None:
    rig.surface.send("/brush/1/prompt", "hat")
    rig.surface.wait_for(applied_addr("/brush/1/prompt"))
    for level in (1, 1, 1):
        rig.surface.send("/brush/1/clear", level)
    rig.surface.wait_for(applied_addr("/brush/1/clear"))
    rig.surface.send("/brush/1/prompt", "hat")  # the same prompt again: a new brush, not a repeat
    rig.surface.wait_for(applied_addr("/brush/1/prompt"))
    for level in (0, 0, 1, 1):
        rig.surface.send("/brush/1/clear", level)
    rig.surface.wait_for(applied_addr("/brush/1/clear"))
    rig.surface.send("/delta", 0.3)
    rig.surface.wait_for(applied_addr("/delta"))
    assert [u.value for u in rig.applied if u.key == "brush" and u.value[1] == "clear"] == [
        (1, "clear", None), (1, "clear", None)]
    assert rig.server.stats()["accepted"] == 5  # prompt, clear, prompt, clear, delta


def test_status_reply_has_state_counters_and_values(rig: Rig) -> None:
    rig.surface.send("/guidance", 4.0)
    rig.surface.wait_for(applied_addr("/guidance"))
    rig.surface.send("/brush/7/rect", 0.0, 0.0, 0.5, 0.5)
    rig.surface.wait_for(applied_addr("/brush/7/rect"))
    rig.surface.inbox.clear()
    rig.surface.send("/status")
    assert rig.surface.wait_for("/streamnode/state") == ["streaming"]
    (fps,) = rig.surface.wait_for("/streamnode/fps")
    assert fps > 0
    assert len(rig.surface.wait_for("/streamnode/latency_ms")) == 1
    assert rig.surface.wait_for("/streamnode/dropped")[0] >= 0
    assert rig.surface.wait_for("/streamnode/skipped") == [0]
    assert rig.surface.wait_for(applied_addr("/guidance")) == [4.0]
    assert rig.surface.wait_for(applied_addr("/t_index")) == [35]
    assert rig.surface.wait_for(applied_addr("/brush/7/prompt_strength")) == [pytest.approx(0.95)]
    assert rig.surface.wait_for(applied_addr("/brush/7/rect")) == [0.0, 0.0, 0.5, 0.5]


# -- heartbeat and state ------------------------------------------------------------------


def test_heartbeat_state_and_error_go_to_the_surface() -> None:
    surface = Surface()
    queue = ControlQueue()
    st: dict[str, Any] = {"state": "loading_model", "fps_out": 0.0, "latency_ms_p50": 0.0, "dropped": 0,
                          "skipped": 0, "error": "", "params": {}}
    server = OscServer(OscConfig(port=0, reply=f"127.0.0.1:{surface.port}"), queue, lambda: dict(st))
    server.start()
    try:
        # --osc-reply: replies go there before anyone has sent anything.
        assert surface.wait_for("/streamnode/heartbeat", timeout=3) == [1]
        assert surface.wait_for("/streamnode/state") == ["loading_model"]
        st.update(state="streaming", fps_out=24.0)
        t0 = time.monotonic()
        assert surface.wait_for("/streamnode/state", where=lambda p: p == ["streaming"]) == ["streaming"]
        assert time.monotonic() - t0 < 0.9  # a state change does not wait for the next heartbeat
        assert surface.wait_for("/streamnode/fps", where=lambda p: p == [24.0])
        assert surface.wait_for("/streamnode/heartbeat", timeout=3) == [2]
        st.update(state="error", error="CUDA out of memory")
        assert surface.wait_for("/streamnode/error") == ["CUDA out of memory"]
    finally:
        server.stop()
        surface.close()


def test_status_function_errors_do_not_stop_the_heartbeat() -> None:
    surface = Surface()

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    server = OscServer(OscConfig(port=0, reply=f"127.0.0.1:{surface.port}"), ControlQueue(), broken)
    server.start()
    try:
        assert surface.wait_for("/streamnode/heartbeat", timeout=3) == [1]
        assert surface.wait_for("/streamnode/heartbeat", timeout=3) == [2]
    finally:
        server.stop()
        surface.close()


# -- prefix and allow-list ----------------------------------------------------------------


def test_prefix_lets_nodes_share_a_surface(components) -> None:  # noqa: ANN001
    rig = Rig(components, prefix="/vj1")
    try:
        rig.surface.send("/vj1/guidance", 5.0)
        assert rig.surface.wait_for(applied_addr("/guidance", "/vj1")) == [5.0]
        assert rig.live().params.guidance_scale == 5.0
        rig.surface.send("/vj2/guidance", 6.0)  # another node's: ignored quietly
        rig.surface.send("/guidance", 7.0)  # unprefixed: not ours either
        rig.surface.send("/vj1/nope", 1.0)
        errors = rig.surface.errors()
        assert len(errors) == 1 and errors[0].startswith("/vj1/nope: unknown address")
        assert rig.live().params.guidance_scale == 5.0
        assert rig.server.stats()["foreign"] == 2
        rig.surface.send("/vj1/status")
        assert rig.surface.wait_for("/vj1/streamnode/state") == ["streaming"]
        rig.surface.send("/vj1/guidance", "x")
        assert rig.surface.errors() == ["/vj1/guidance: expects a number (0..20), got s 'x'"]
    finally:
        rig.close()


def test_allow_list_drops_and_counts_other_senders(components) -> None:  # noqa: ANN001
    rig = Rig(components, allow=["127.0.0.2/32"])  # the surface sends from 127.0.0.1: not allowed
    try:
        rig.surface.send("/guidance", 5.0)
        rig.surface.send("/nope")
        assert rig.surface.collect(0.3) == []  # no reply at all, not even an error
        assert rig.live().params.guidance_scale == LiveParams().guidance_scale
        assert rig.server.stats()["denied"] == 2
    finally:
        rig.close()
    rig = Rig(components, surface_host="127.0.0.2", allow=["127.0.0.2/32"])  # an allowed sender
    try:
        rig.surface.send("/guidance", 5.0)
        assert rig.surface.wait_for(applied_addr("/guidance")) == [5.0]
        assert rig.server.stats()["denied"] == 0
    finally:
        rig.close()


def test_open_host_needs_an_allow_list() -> None:
    with pytest.raises(ValueError, match="allow-list"):
        OscConfig(host="0.0.0.0")
    OscConfig(host="0.0.0.0", allow=["192.168.1.0/24"])


# -- rejections ---------------------------------------------------------------------------

BAD = [
    (message("/guidance", "high"), "/guidance: expects a number"),
    (message("/guidance"), "/guidance: takes f (0..20); got no arguments"),
    (message("/guidance", 1.0, 2.0), "/guidance: takes f"),
    (message("/guidance", 25.0), "/guidance: 25.0 is out of range 0..20"),
    (message("/guidance", float("nan")), "/guidance: nan is not a finite number"),
    (message("/delta", float("inf")), "/delta: inf is not a finite number"),
    (message("/seed", -1), "/seed: -1 is out of range"),
    (message("/t_index", 45, 32), "/t_index: t_index_list = [45, 32] is not valid: indices must be strictly increasing"),
    (message("/t_index", 1, 2, 3, 4, 5, 6, 7, 8, 9), "/t_index: takes i…"),
    (message("/t_index", 50), "/t_index: 50 is out of range 0..49"),
    (message("/prompt_blend", "a", 0.5, "b"), "/prompt_blend: takes (s f)…"),
    (message("/prompt_blend", "a", 0.0), "the weights must not all be 0"),
    (message("/seed_blend", 1, 0.5, "x", 0.5), "/seed_blend: expects a number"),
    (message("/blend_method", "cubic"), "/blend_method: 'cubic' is not one of linear, slerp"),
    (message("/prompt", 42), "/prompt: expects a string, got i"),
    (message("/prompt", "x" * 65_000), "/prompt: a string of 65000 chars is too long (at most 4096)"),
    (message("/preset", "../../etc/passwd"), "/preset: '../../etc/passwd' is not a preset name"),
    (message("/preset", "demo.toml"), "/preset: 'demo.toml' is not a preset name"),
    (message("/preset", "no_such_preset"), "/preset: no preset 'no_such_preset'; available: "),
    (message("/model", "stabilityai/sd-turbo"), "/model: loading a model over OSC is off"),
    (message("/pause", 2), "/pause: 2 is out of range 0..1"),
    (message("/guidnace", 1.0), "/guidnace: unknown address; did you mean /guidance?"),
    (message("/status", "now"), "/status: expects a number"),
    (b"\x00\x01garbage", "not an OSC packet"),
    (b"/guidance\x00\x00\x00,i\x00\x00\x40", "malformed OSC message"),  # truncated int
    (b"/prompt\x00,s\x00\x00abcd", "malformed OSC message"),  # unterminated string
    (b"/guidance\x00\x00\x00,x\x00\x00\x00\x00\x00\x00", "unsupported OSC argument type 'x'"),
    (b"/guidance\x00\x00\x00,[f]\x00\x00\x00\x00\x00\x00", "unsupported OSC argument type '[]'"),
    (b"/\xff\xfe\x00,f\x00\x00\x00\x00\x00\x00", "malformed OSC message"),
    (b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4) + b"abcd", "bundle: bad element size -4"),
    (b"#bundle\x00\x00", "bundle: shorter than its header"),
]


@pytest.fixture(scope="module")
def shared_rig(components):  # noqa: ANN001, ANN201
    r = Rig(components)
    yield r
    r.close()


@pytest.mark.parametrize("case", range(len(BAD)), ids=[r for _, r in BAD])
def test_bad_messages_get_one_error_reply_and_the_server_keeps_serving(shared_rig: Rig, case: int) -> None:
    rig, (data, reason) = shared_rig, BAD[case]
    rig.surface.inbox.clear()
    rejected = rig.server.stats()["rejected"]
    rig.surface.send_raw(data)
    # A good message right behind it: its echo comes after any error reply the bad one caused.
    rig.surface.send("/guidance", 1.0 + case / 10)
    # The engine applies it at its next frame: wait for this case's echo, not an earlier one.
    rig.surface.wait_for(applied_addr("/guidance"), where=lambda p: p == [pytest.approx(1.0 + case / 10)])
    errors = [p[0] for a, p in rig.surface.inbox if a == "/streamnode/error"]
    assert len(errors) == 1, errors
    assert reason in errors[0]
    assert rig.server.stats()["rejected"] == rejected + 1


def test_rejections_are_logged_once_per_address_per_interval(rig: Rig, caplog) -> None:
    caplog.set_level("WARNING", logger="streamnode.control.osc")
    for _ in range(50):
        rig.surface.send("/guidance", 99.0)
    rig.surface.send("/delta", 99.0)
    rig.surface.send("/delta", 0.5)
    rig.surface.wait_for(applied_addr("/delta"))
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2 and "/guidance" in lines[0] and "/delta" in lines[1]
    assert rig.server.stats()["rejected"] == 51


def test_model_switch_only_when_allowed(components, tiny_model_path) -> None:  # noqa: ANN001
    rig = Rig(components, allow_model_switch=True)
    try:
        rig.surface.send("/model", str(tiny_model_path))  # the tiny model's folder: a real load
        assert rig.surface.wait_for(applied_addr("/model"), timeout=60) == [str(tiny_model_path)]
        assert rig.live().node.model == str(tiny_model_path) and rig.node.config.model.id == str(tiny_model_path)
    finally:
        rig.close()


def test_bundles_are_unpacked_recursively(rig: Rig) -> None:
    inner = bundle(message("/delta", 0.25), message("/seed", 9))
    rig.surface.send_raw(bundle(message("/guidance", 6.0), inner, message("/nope", 1)))
    rig.surface.wait_for(applied_addr("/seed"))
    assert rig.live().params.guidance_scale == 6.0 and rig.live().params.delta == 0.25
    assert len(rig.surface.errors()) == 1  # /nope, once


def test_our_own_replies_looped_back_are_ignored(rig: Rig) -> None:
    rig.surface.send("/streamnode/heartbeat", 1)
    rig.surface.send("/streamnode/applied/guidance", 1.0)
    assert rig.surface.errors() == []


# -- flood --------------------------------------------------------------------------------


def test_a_flood_of_chop_traffic_does_not_stall_frames(rig: Rig) -> None:
    """~10,000 msgs/s for 1 s (100 channels, mostly unchanged values, one moving): the engine
    keeps streaming and only changed values reach the queue."""
    channels = ["/guidance", "/delta", "/strength", "/similarity"]
    gaps: list[float] = []
    done = threading.Event()

    def watch() -> None:  # the longest wait between two output frames while the flood lasts
        last_count, last_t = rig.node.frames_out, time.monotonic()
        while not done.wait(0.002):
            count, now = rig.node.frames_out, time.monotonic()
            if count != last_count:
                gaps.append(now - last_t)
                last_count, last_t = count, now

    watcher = threading.Thread(target=watch)
    watcher.start()
    frames_before = rig.node.frames_out
    sent = 0
    t0 = time.monotonic()
    for tick in range(100):  # 100 cooks of 10 ms, 100 datagrams each
        for ch in range(100):
            value = 0.5 if ch else (tick % 10) / 10  # one moving channel, the rest constant
            rig.surface.send_raw(message(channels[ch % len(channels)], value))
        sent += 100
        sleep = t0 + (tick + 1) * 0.01 - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
    rig.surface.send("/seed", 77)
    rig.surface.wait_for(applied_addr("/seed"), timeout=5)
    done.set()
    watcher.join()
    stats = rig.server.stats()
    assert sent == 10_000
    assert stats["deduped"] + stats["accepted"] >= 0.9 * sent  # the kernel may drop a few under load
    assert stats["accepted"] < 200  # only changes reached the queue
    assert rig.node.frames_out - frames_before > 5  # frames kept flowing
    assert max(gaps) < 1.0  # a stall would be seconds; a loaded CI box is allowed some jitter


# -- lifecycle ----------------------------------------------------------------------------


def test_start_and_stop_are_safe_twice_and_a_busy_port_is_a_clear_error() -> None:
    queue = ControlQueue()
    server = OscServer(OscConfig(port=0), queue)
    server.stop()  # before start: nothing to do
    server.start()
    server.start()
    other = OscServer(OscConfig(port=server.port), queue)
    with pytest.raises(OscStartError, match="choose another --osc-port"):
        other.start()
    server.stop()
    server.stop()
    assert server._threads and not any(t.is_alive() for t in server._threads)


def test_lookup_rejects_lookalike_brush_addresses() -> None:
    assert lookup("/brush/0/prompt", 8) is not None
    for address in ("/brush/N/prompt", "/brush/-1/prompt", "/brush/8/prompt", "/brush/0/nope",
                    "/brush/0/prompt/x", "/brush/00000/prompt", "/brush", "/brush/0"):
        assert lookup(address, 8) is None, address
