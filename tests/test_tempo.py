"""The tempo layer on its own: clocks asked for explicit times (a simulated clock needs no
sleeping), the quantizer's grid and lookahead, LFO waves, MIDI clock from synthetic pulses,
the cue list's stepping."""

from __future__ import annotations

import math

import pytest

from streamnode.live_params import CueParams, LfoParams, numeric_target
from streamnode.tempo import cues, lfo
from streamnode.tempo.clock import Clock, InternalClock
from streamnode.tempo.midi_clock import PPQN, MidiClock
from streamnode.tempo.quantize import Quantizer, grid_beats, next_line


def test_internal_clock_counts_beats_and_bends_at_a_tempo_change() -> None:
    clock = InternalClock(120.0, 4, origin=100.0)
    p = clock.at(102.25)  # 2.25 s at 2 beats/s
    assert p.beat == pytest.approx(4.5) and p.bar == 1 and p.beat_in_bar == 0 and p.phase == pytest.approx(0.125)
    clock.set_bpm(60.0, t=102.25)
    assert clock.at(102.25).beat == pytest.approx(4.5), "the beat does not jump at a tempo change"
    assert clock.at(104.25).beat == pytest.approx(6.5)
    clock.downbeat(t=104.25)  # 6.5 → the nearest bar line, 8
    assert clock.at(104.25).beat == pytest.approx(8.0) and clock.at(104.25).beat_in_bar == 0
    with pytest.raises(ValueError, match="20..999"):
        clock.set_bpm(5.0)
    assert isinstance(clock, Clock) and isinstance(MidiClock(), Clock)


def test_quantizer_waits_for_the_line_after_the_lookahead_and_latest_wins() -> None:
    assert grid_beats("bar", 4) == 4.0 and grid_beats("2bars", 3) == 6.0 and grid_beats("off", 4) is None
    assert next_line(3.99, 1.0) == 4.0 and next_line(4.0, 1.0) == 5.0 and next_line(5.0, 4.0) == 8.0
    q: Quantizer[str] = Quantizer()
    # At beat 3.5 with the lookahead already at 3.9: the line is 4.
    assert q.hold("guidance", "g1", 1.0, 3.9) == 4.0
    # A change that can no longer make line 4 (its frame would leave after it) waits for 5.
    assert q.hold("prompt", "p", 1.0, 4.05) == 5.0
    assert q.hold("guidance", "g2", 1.0, 3.95) == 4.0  # replaces g1
    assert q.due(3.99) == [] and len(q) == 2
    assert [h.item for h in q.due(4.0)] == ["g2"]
    assert [h.item for h in q.due(5.2)] == ["p"] and len(q) == 0


@pytest.mark.parametrize(("shape", "points"), [
    ("sine", {0.0: 0.0, 0.25: 1.0, 0.75: -1.0}),
    ("triangle", {0.0: -1.0, 0.25: 0.0, 0.5: 1.0}),
    ("saw", {0.0: -1.0, 0.5: 0.0, 0.999: 0.998}),
    ("square", {0.1: 1.0, 0.6: -1.0}),
    ("envelope", {0.0: 1.0, 0.5: math.exp(-2.5)}),
])
def test_lfo_waves(shape: str, points: dict[float, float]) -> None:
    for x, want in points.items():
        assert lfo.wave(shape, x + 3.0) == pytest.approx(want, abs=1e-9), (shape, x)


def test_random_hold_keeps_one_value_per_cycle_and_changes_between_cycles() -> None:
    firsts = [lfo.wave("random", n + 0.01) for n in range(64)]
    assert all(lfo.wave("random", n + 0.9) == firsts[n] for n in range(64))
    assert len(set(firsts)) == 64 and all(-1.0 <= v <= 1.0 for v in firsts)
    assert abs(sum(firsts) / 64) < 0.3  # spread over −1..1, not stuck at one end


def test_lfo_value_follows_the_beat_or_the_seconds_and_stays_in_the_target_range() -> None:
    guidance = numeric_target("/guidance")
    synced = LfoParams(target="/guidance", shape="sine", beats=4.0, depth=0.5, offset=1.2)
    assert lfo.value(synced, guidance, beat=1.0, seconds=123.0) == pytest.approx(1.7)  # a quarter cycle
    free = synced.model_copy(update={"sync": False, "hz": 2.0})
    assert lfo.value(free, guidance, beat=0.0, seconds=0.125) == pytest.approx(1.7)
    wide = synced.model_copy(update={"depth": 50.0})
    assert lfo.value(wide, guidance, 1.0, 0.0) == 20.0 and lfo.value(wide, guidance, 3.0, 0.0) == 0.0
    skip = numeric_target("/similarity_max_skip")
    assert lfo.value(LfoParams(target="/similarity_max_skip", offset=3.3), skip, 0.0, 0.0) == 3  # an int target
    with pytest.raises(ValueError, match="not a numeric live parameter"):
        LfoParams(target="/prompt")


def test_midi_clock_tempo_start_stop_and_song_position() -> None:
    clock = MidiClock(120.0)
    pulse = 60.0 / (128.0 * PPQN)
    t = 9.0
    for _ in range(PPQN):  # pulses while stopped: the tempo, not the beat
        t += pulse
        clock.feed("clock", t)
    assert clock.at(t).bpm == pytest.approx(128.0, rel=0.01) and clock.at(t).beat == 0.0
    t = 10.0
    clock.feed("start", t)
    assert clock.at(t).beat == pytest.approx(-1 / PPQN)  # the first pulse after Start is beat 0
    for _ in range(2 * PPQN + 1):  # two beats at 128 bpm, with a little jitter
        t += pulse * (1.0 + 0.05 * math.sin(t * 977.0))
        clock.feed("clock", t)
    p = clock.at(t)
    assert p.bpm == pytest.approx(128.0, rel=0.02) and p.beat == pytest.approx(2.0) and p.playing
    assert clock.at(t + 10.0).beat == pytest.approx(2.0 + 1 / PPQN), "no further than one pulse past the last"
    clock.feed("stop", t + 0.001)
    assert not clock.at(t + 5.0).playing and clock.at(t + 5.0).beat == pytest.approx(2.0)
    clock.feed("songpos", t + 1.0, 32)  # 32 sixteenths = bar 2
    clock.feed("continue", t + 1.0)
    clock.feed("clock", t + 1.01)
    assert clock.at(t + 1.01).beat == pytest.approx(8.0) and clock.at(t + 1.01).bar == 2


def test_cue_list_steps_in_index_order_and_every_n_bars() -> None:
    listed = {0: CueParams(prompt="a"), 3: CueParams(prompt="b", seed=7), 5: CueParams(prompt="c")}
    assert cues.next_index(listed, -1) == 0 and cues.next_index(listed, 0) == 3 and cues.next_index(listed, 5) == 0
    assert cues.next_index({}, 0) is None
    assert cues.changes(listed[3]) == {"prompt_transition_frames": 8, "prompt": "b", "seed": 7}
    assert "seed" not in cues.changes(listed[0])
    assert cues.due_steps(1.9, 2.05, 2) and not cues.due_steps(2.05, 3.9, 2) and cues.due_steps(3.9, 4.0, 2)
    assert not cues.due_steps(1.0, 9.0, 0)
