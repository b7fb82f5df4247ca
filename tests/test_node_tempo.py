"""The node on the real engine (the tiny model) following a clock: a quantized change is held
for its beat and rides the frame that leaves on it; LFOs move their target every frame; the
cue list steps. The clock is the internal one at a known origin (a simulated clock: the test
knows exactly when each beat falls)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support import clock_sinks, small_config, tiny_factory, wait_for

from streamnode.control.updates import Update
from streamnode.node import Node
from streamnode.tempo.clock import InternalClock

HANDED: list[float] = []
"""When the engine thread handed each frame to the outputs."""


@pytest.fixture(scope="module")
def node(components) -> Iterator[tuple[Node, InternalClock]]:  # noqa: ANN001
    clock = InternalClock(240.0, 4)  # a beat every 0.25 s
    with clock_sinks():
        n = Node(small_config(sinks=["clock://"]), engine_factory=tiny_factory(components), clock=clock)
        # Stamped as the engine thread hands a frame to the outputs: the first stamp after a change's
        # report is the frame computed with it (the sink thread may still be sending the one before).
        publish = n.outputs.publish
        n.outputs.publish = lambda image, tag: (publish(image, tag), HANDED.append(time.monotonic()))[0]
        n.start()
        try:
            wait_for(lambda: n.frames_out > 3, 60.0, "streaming")
            yield n, clock
        finally:
            n.stop()


def test_a_quantized_change_waits_for_its_beat_and_leaves_on_it(node) -> None:  # noqa: ANN001
    n, clock = node
    applied: list[tuple[float, float, float]] = []  # (time applied, the beat it was held for, the lookahead)
    n.queue.on_report(lambda u, err: applied.append((time.monotonic(), n.tempo.releasing, n.tempo.lookahead_s()))
                      if u.key == "guidance_scale" else None)  # on the engine thread, as it is applied
    errors = []
    for value in (2.0, 3.0, 4.0):
        now = time.monotonic()
        beat = clock.at(now).beat
        sent_phase = beat % 1.0
        if sent_phase > 0.5:  # send in the first half of a beat: the next line is then clearly ahead
            time.sleep((1.0 - sent_phase) * 0.25 + 0.01)
        t_sent = time.monotonic()
        n.queue.put(Update("guidance_scale", value, origin="/guidance", quantize="beat"))
        wait_for(lambda v=value: n.live().params.guidance_scale == v, 5.0, "the change applied")
        t_apply, line, lookahead = applied[-1]
        assert line in (clock.at(t_sent).beat // 1 + 1, clock.at(t_sent).beat // 1 + 2), "the next beat (or the one after)"
        t_line = t_sent + clock.at(t_sent).seconds_to(line)
        assert t_apply >= t_line - lookahead - 0.01, "held until the beat, less the lookahead"
        first_out = wait_for(lambda t=t_apply: next((s for s in HANDED if s > t), None), 5.0, "a frame")
        errors.append(first_out - t_line)
    call_s = max(n.engine_ms / 1000.0, 1 / 30)
    # Within one engine call (or input frame) of the beat, plus scheduling slack on a busy CPU;
    # without the hold it would be up to a beat (0.25 s) early.
    assert all(-call_s - 0.05 <= e <= call_s + 0.1 for e in errors), (errors, call_s)


def test_an_lfo_moves_its_target_on_the_beat_and_clearing_it_stops_it(node) -> None:  # noqa: ANN001
    n, _ = node
    n.queue.put(Update("lfo", (0, {"target": "/guidance", "shape": "square", "beats": 1.0, "depth": 1.0,
                                   "offset": 5.0}), origin="/lfo/0"))
    seen = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and len(seen) < 2:
        seen.add(n.live().params.guidance_scale)
        time.sleep(0.01)
    assert seen >= {4.0, 6.0} and 0 in n.live().lfos
    n.queue.put(Update("lfo", (0, "clear", None), origin="/lfo/0/clear"))
    wait_for(lambda: not n.live().lfos, 5.0, "the LFO removed")
    time.sleep(0.1)
    held = n.live().params.guidance_scale
    time.sleep(0.6)
    assert n.live().params.guidance_scale == held, "no LFO: the target keeps its last value"


def test_the_cue_list_steps_on_cue_next_and_by_number(node) -> None:  # noqa: ANN001
    n, _ = node
    n.queue.put(Update("cues", (0, {"prompt": "a red fox", "seed": 11, "transition": 0}), origin="/cues/0"))
    n.queue.put(Update("cues", (4, {"prompt": "a blue owl"}), origin="/cues/4"))
    n.queue.put(Update("cue_next", None, origin="/cue_next"))
    wait_for(lambda: n.live().node.cue == 0, 5.0, "cue 0")
    assert n.live().params.prompt == "a red fox" and n.live().params.seed == 11
    n.queue.put(Update("cue_next", None, origin="/cue_next"))
    wait_for(lambda: n.live().node.cue == 4, 5.0, "cue 4")
    assert n.live().params.prompt == "a blue owl" and n.live().params.seed == 11  # seed -1 keeps it
    n.queue.put(Update("cue", 0, origin="/cue"))
    wait_for(lambda: n.live().params.prompt == "a red fox", 5.0, "back to cue 0")


def test_a_preset_brings_its_lfos_and_cues(node, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    n, _ = node
    monkeypatch.setenv("STREAMNODE_PRESETS", str(tmp_path))
    (tmp_path / "beats.toml").write_text('[model]\nid = "tiny"\n\n[[lfos]]\ntarget = "/delta"\nshape = "saw"\n'
                                         'depth = 0.5\noffset = 1.0\n\n[[cues]]\nprompt = "a cave"\n')
    n.queue.put(Update("lfo", (3, {"target": "/guidance", "offset": 2.0}), origin="/lfo/3"))
    wait_for(lambda: 3 in n.live().lfos, 5.0, "an LFO of our own")
    n.queue.put(Update("preset", "beats", origin="/preset"))
    wait_for(lambda: n.live().node.preset == "beats", 5.0, "the preset in force")
    live = n.live()
    assert list(live.lfos) == [0] and live.lfos[0].target == "/delta", "the preset's LFOs replace the others"
    assert [c.prompt for c in live.cues.values()] == ["a cave"]
    deltas = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and len(deltas) < 3:
        deltas.add(round(n.live().params.delta, 3))
        time.sleep(0.02)
    assert len(deltas) >= 3 and all(0.5 <= d <= 1.5 for d in deltas), deltas
