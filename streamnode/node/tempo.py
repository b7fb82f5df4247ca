"""The node's tempo (engine thread): the clock, the changes held for the beat, the LFOs and the
cue list.

Right before each engine call `before_call()` asks the clock where the music will be when this
call's frame leaves the node (now + the engine's call time, the median of the last 15 calls,
+ `tempo.lookahead_ms`; for releasing changes, plus half a frame-boundary step: the
lookahead), then

1. releases the quantized changes whose grid line that position has reached, through the
   applier like any other update (validated, reported, echoed);
2. steps the cue list when a `cue_every`-bar line has passed;
3. sets every running LFO's target to the LFO's value at that position.

The LFOs and the cue list are the node's own live values: this object is their only writer and
the node lays them over the `LiveState` it publishes (`/lfo/N/...`, `/cues/N/...` in OSC,
OSCQuery and presets). docs/tempo.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from streamnode.config import NodeConfig
from streamnode.control.updates import Update
from streamnode.live_params import CueParams, LfoParams, NumericTarget, validated
from streamnode.log_limit import LogLimiter, held_text
from streamnode.tempo import cues as cue_list
from streamnode.tempo import lfo as lfos
from streamnode.tempo.clock import Clock, InternalClock, Position
from streamnode.tempo.quantize import Quantizer, grid_beats

if TYPE_CHECKING:
    from streamnode.engine import Engine
    from streamnode.node.apply import Applier
    from streamnode.node.lifecycle import Node

logger = logging.getLogger(__name__)

_WINDOW = 15  # calls in the latency's median


def _median(values: deque[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


UNQUANTIZED = frozenset({"bpm", "quantize", "midi_learn", "downbeat", "cue_every", "model"})
"""Keys that act at once even while /quantize is on (tempo controls; a model load takes long anyway)."""
TEMPO_KEYS = frozenset({"bpm", "quantize", "cue", "cue_every", "cue_next", "downbeat", "midi_learn", "lfo", "cues"})
"""The update keys this object applies."""


def make_clock(config: NodeConfig) -> Clock:
    """The clock `config.tempo` asks for (a missing binding raises with the fix)."""
    t = config.tempo
    if t.source == "link":
        from streamnode.tempo.link import LinkClock

        return LinkClock(t.bpm, t.beats_per_bar)
    if t.source == "midi":
        from streamnode.tempo.midi_clock import MidiClock

        return MidiClock(t.bpm, t.beats_per_bar)
    return InternalClock(t.bpm, t.beats_per_bar)


class Tempo:
    """The node's tempo; every method but `position` and `status` runs on the engine thread."""

    def __init__(self, node: Node, clock: Clock | None = None) -> None:
        self.node = node
        self.clock: Clock = clock or InternalClock(node.config.tempo.bpm, node.config.tempo.beats_per_bar)
        self.held: Quantizer[Update] = Quantizer()
        self.lfos: Mapping[int, LfoParams] = {i: LfoParams(**c.model_dump()) for i, c in enumerate(node.config.lfos)}
        self.cues: Mapping[int, CueParams] = {i: CueParams(**c.model_dump()) for i, c in enumerate(node.config.cues)}
        self._targets: dict[int, NumericTarget | None] = {i: lfos.target_of(p) for i, p in self.lfos.items()}
        self._driven: dict[int, float | int] = {}  # the value each LFO last set
        self._origin = time.monotonic()  # Hz LFOs count seconds from here
        self._bar: float | None = None  # where the last call was, for cue_every
        # The last calls' durations and the gaps between frame boundaries (seconds): their
        # medians are the latency and the boundary step, so one call slowed by the machine does
        # not move every beat (a mean would, for many frames).
        self._calls: deque[float] = deque(maxlen=_WINDOW)
        self._gaps: deque[float] = deque(maxlen=_WINDOW)
        self._last_call: float | None = None
        self.releasing = 0.0
        """The beat (grid line) of the held change being applied now; read by report listeners."""
        self._log_limit = LogLimiter()

    @property
    def beats_per_bar(self) -> int:
        return self.clock.beats_per_bar

    def call_done(self, ms: float) -> None:
        """An engine call took `ms` (engine thread, after each call but the first)."""
        self._calls.append(ms / 1000.0)

    def latency_s(self) -> float:
        """How long after now a frame whose call starts now leaves the node: the engine's measured
        call time (the median of the last calls) plus `tempo.lookahead_ms`."""
        return _median(self._calls) + self.node.config.tempo.lookahead_ms / 1000.0

    def lookahead_s(self) -> float:
        """How long before its beat a change is released: the latency, plus half the time between
        two frame boundaries, so the change rides whichever boundary's frame leaves nearest the
        beat (early or late by at most half a boundary step) rather than always the one after."""
        return self.latency_s() + _median(self._gaps) / 2.0

    def position(self, t: float | None = None) -> Position:
        """Where the music is (any thread: the clock's `at` is)."""
        return self.clock.at(time.monotonic() if t is None else t)

    def status(self) -> dict[str, Any]:
        """The clock and what waits for it, for `Node.status()` (any thread: reads snapshots)."""
        position = self.position()
        return {"source": self.clock.name, "bpm": round(position.bpm, 3), "bar": position.bar,
                "beat": position.beat_in_bar, "playing": position.playing, "held": len(self.held),
                "lfos": len(self.lfos), "cues": len(self.cues)}

    # -- held changes

    def hold(self, update: Update) -> bool:
        """Hold `update` for its grid line if it is quantized (its own grid, else the node's);
        True when held. Engine thread."""
        mode = update.quantize or self.node.switches.quantize
        if mode == "off" or update.key in UNQUANTIZED:
            return False
        grid = grid_beats(mode, self.beats_per_bar)
        assert grid is not None
        # The line after where the music will be when a frame started at its arrival leaves: a
        # change that arrived in time for a line is not pushed a whole grid step by the wait
        # for the frame boundary (it is released at once, then, at most one call late).
        ahead = self.clock.at(update.at + self.lookahead_s())
        self.held.hold(update.slot, update, grid, ahead.beat)
        return True

    # -- once per engine call

    def before_call(self, applier: Applier) -> None:
        """Release due changes, step the cues, drive the LFOs (engine thread, before a call)."""
        now = time.monotonic()
        if self._last_call is not None and now - self._last_call < 1.0:
            self._gaps.append(now - self._last_call)
        self._last_call = now
        ahead = self.clock.at(now + self.lookahead_s())
        if len(self.held):
            for held in self.held.due(ahead.beat):
                self.releasing = held.line  # whoever hears of the update can tell its beat
                applier.apply_one(held.item)
        bar = ahead.beat / self.beats_per_bar
        every = self.node.switches.cue_every
        if self._bar is not None and self.cues and cue_list.due_steps(self._bar, bar, every):
            applier.apply_one(Update("cue_next", None, origin="/cue_every"))
        self._bar = bar
        t = now + self.latency_s()  # when this call's frame leaves: the LFOs' time
        if self.lfos and self._drive(self.clock.at(t).beat, t - self._origin):
            self.node.publish_live()

    def _drive(self, beat: float, seconds: float) -> bool:
        engine = self.node.engine
        if engine is None:
            return False
        plain: dict[int, tuple[str, Any]] = {}  # LFOs on plain parameters: one engine update for all
        changed = False
        for index, params in self.lfos.items():
            target = self._targets.get(index)
            if target is None:
                continue
            value = lfos.value(params, target, beat, seconds, salt=index)
            if self._driven.get(index) == value:
                continue  # a square's flat half, an integer target between steps: nothing to do
            if target.index is None:
                plain[index] = (target.key, value)
            elif self._drive_one(index, self._edit_indexed, engine, target, value):
                self._driven[index] = value
                changed = True
        if len(plain) > 1:
            try:
                engine.update(**dict(plain.values()))
            except Exception:  # noqa: BLE001 - which one cannot: found out one by one below
                pass
            else:
                self._driven.update({index: value for index, (_key, value) in plain.items()})
                return True
        for index, (key, value) in plain.items():
            if self._drive_one(index, self._edit_plain, engine, key, value):
                self._driven[index] = value
                changed = True
        return changed

    def _drive_one(self, index: int, drive: Callable[..., None], *args: Any) -> bool:
        """Run one LFO's engine update; a target that does not exist yet is logged (rate-limited) and skipped."""
        try:
            drive(*args)
        except Exception as e:  # noqa: BLE001 - a target that does not exist yet: logged, skipped
            if (held := self._log_limit(f"lfo:{index}")) is not None:
                logger.warning("LFO %d cannot drive %s: %s%s", index, self.lfos[index].target, e, held_text(held))
            return False
        return True

    @staticmethod
    def _edit_plain(engine: Engine, key: str, value: Any) -> None:
        engine.update(**{key: value})

    @staticmethod
    def _edit_indexed(engine: Engine, target: NumericTarget, value: Any) -> None:
        if target.key == "brush":
            engine.update(brush=(target.index, target.field, value))
            return
        # lora weight: runtime mode only (a merged LoRA re-merges off-thread: not per frame)
        edit = (target.index, target.field, value)
        if engine.lora_heavy(edit):
            raise ValueError("a merged LoRA's weight cannot follow an LFO; use model.lora_mode runtime")
        engine.update(lora=edit)

    # -- the tempo's own updates (Applier.apply hands them here)

    def apply(self, update: Update, applier: Applier) -> None:
        key, value = update.key, update.value
        node = self.node
        if key == "bpm":
            self.clock.set_bpm(float(value))
            node.set_switches(bpm=float(value))
        elif key in ("quantize", "cue_every", "midi_learn"):
            node.set_switches(**{key: value})
        elif key == "downbeat":
            self.clock.downbeat()
        elif key == "cue_next":
            following = cue_list.next_index(self.cues, node.switches.cue)
            if following is None:
                raise ValueError("the cue list is empty: add cues with /cues/N/prompt")
            self.go_to(following)
        elif key == "cue":
            self.go_to(int(value))
        elif key == "lfo":
            self.lfos = self._edit(self.lfos, LfoParams, value, node.config.runtime.max_lfos, "lfo")
            self._targets = {i: lfos.target_of(p) for i, p in self.lfos.items()}
            self._driven.clear()
            node.publish_live()
        elif key == "cues":
            self.cues = self._edit(self.cues, CueParams, value, node.config.runtime.max_cues, "cue")
            node.publish_live()
        else:
            raise ValueError(f"unknown tempo key {key!r}")

    def go_to(self, index: int) -> None:
        cue = self.cues.get(index)
        if cue is None:
            raise ValueError(f"cue {index} does not exist (cues: {sorted(self.cues) or 'none'})")
        engine = self.node.engine
        assert engine is not None
        for name, value in cue_list.changes(cue).items():
            engine.update(**{name: value})
        self.node.set_switches(cue=index)

    @staticmethod
    def _edit(members: Mapping[int, Any], model: type, value: Any, limit: int, noun: str) -> dict[int, Any]:
        """An indexed-group edit ((index, field or "clear", value) or (index, {fields})) → the new members."""
        index = int(value[0])
        if not 0 <= index < limit:
            raise ValueError(f"{noun} {value[0]}: use 0..{limit - 1}")
        out = dict(members)
        if isinstance(value[1], dict):
            out[index] = validated(model, value[1])
        elif value[1] == "clear":
            out.pop(index, None)
        else:
            current = out.get(index) or model()
            out[index] = validated(model, {**current.model_dump(), value[1]: value[2]})
        return out

    def replace_all(self, lfo_list: list[Any], cue_items: list[Any]) -> None:
        """A preset's LFOs and cues replace the current ones."""
        self.lfos = {i: LfoParams(**c.model_dump()) for i, c in enumerate(lfo_list)}
        self._targets = {i: lfos.target_of(p) for i, p in self.lfos.items()}
        self._driven.clear()
        self.cues = {i: CueParams(**c.model_dump()) for i, c in enumerate(cue_items)}
        self.node.publish_live()

    def close(self) -> None:
        self.clock.close()
