"""MIDI control: CC and notes mapped to live parameters, a mapping file, a learn mode.

A mapping entry is (kind "cc" or "note", channel 1..16, number 0..127) → an address, with an
optional low/high for the travel (control/mapping.py). A CC's 0..127 is the fader's travel; a
note on is its velocity (0 = off), a note off 0, so a pad drives a switch or a trigger.

Learn: `/midi/learn /guidance` puts the node in learn mode (a live value, NodeParams.midi_learn);
the next CC or note that arrives is mapped to that address, the file is saved, and learn mode
ends (an update on the queue clears it). The file is JSON in the user config folder
(`midi-map.json` beside the user presets, or `midi.mapping`), written atomically, read at start:
the mapping survives restarts.

A port is read every 10 ms (tempo/midi_ports.py) and what arrived meanwhile comes to
`handle_pending` together: of a fader's CCs among them only the newest is mapped (the parameter
would take the last anyway, and a fader swept fast sends hundreds a second), while notes, CCs
mapped to triggers (a rising edge must not be lost) and everything in learn mode are handled one
by one, in order.

`MidiMapper.handle` takes mido messages (or anything with `type`, `channel`, `control`/`note`,
`value`/`velocity`), so it is tested with synthetic messages; the port is opened by
tempo/midi_ports.py. A message that maps nowhere costs nothing; a value the parameter refuses is
logged once per mapping.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamnode.config import user_preset_dir
from streamnode.control.mapping import Target
from streamnode.control.osc import Limits, OscReject
from streamnode.control.updates import ControlQueue, Update
from streamnode.live_params import LiveState
from streamnode.log_limit import LogLimiter, held_text

logger = logging.getLogger(__name__)

Key = tuple[str, int, int]  # ("cc" | "note", channel 1..16, number)


@dataclass(frozen=True)
class MidiBinding:
    kind: str
    channel: int
    number: int
    address: str
    low: float | None = None
    high: float | None = None

    @property
    def key(self) -> Key:
        return (self.kind, self.channel, self.number)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "channel": self.channel, "number": self.number,
                               "address": self.address}
        if self.low is not None:
            out["low"] = self.low
        if self.high is not None:
            out["high"] = self.high
        return out


def default_mapping_path() -> Path:
    """midi-map.json in the user config folder (beside the user presets: ~/.config/streamnode)."""
    return user_preset_dir().parent / "midi-map.json"


def load_mapping(path: Path, limits: Limits) -> list[MidiBinding]:
    """Read a mapping file; a missing file is an empty mapping; a bad one raises ValueError naming
    the entry and the fix."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"MIDI mapping {path}: cannot read it ({e}); fix or delete the file") from None
    entries = data.get("mappings", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"MIDI mapping {path}: expected {{\"mappings\": [...]}}")
    out = []
    for i, e in enumerate(entries):
        try:
            binding = MidiBinding(str(e["kind"]), int(e["channel"]), int(e["number"]), str(e["address"]),
                                  e.get("low"), e.get("high"))
            if binding.kind not in ("cc", "note") or not 1 <= binding.channel <= 16 or not 0 <= binding.number <= 127:
                raise ValueError("kind must be cc or note, channel 1..16, number 0..127")
            Target.of(binding.address, limits, binding.low, binding.high)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"MIDI mapping {path}, entry {i}: {err}") from None
        out.append(binding)
    return out


def save_mapping(path: Path, bindings: list[MidiBinding]) -> None:
    """Write the mapping atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"mappings": [b.to_json() for b in bindings]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".midi-map-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(message: Any) -> tuple[Key, float] | None:
    """A CC or note → (its key, its level 0..1); None for any other message."""
    kind = getattr(message, "type", "")
    if kind == "control_change":
        return ("cc", int(message.channel) + 1, int(message.control)), int(message.value) / 127.0
    if kind in ("note_on", "note_off"):
        level = int(message.velocity) / 127.0 if kind == "note_on" else 0.0
        return ("note", int(message.channel) + 1, int(message.note)), level
    return None


class MidiMapper:
    """MIDI messages → updates on the queue. `handle` runs on the MIDI thread only."""

    def __init__(self, queue: ControlQueue, limits: Limits, path: Path, *,
                 live: Callable[[], LiveState] = LiveState) -> None:
        self.queue = queue
        self.limits = limits
        self.path = path
        self._live = live
        self._lock = threading.Lock()  # learn (MIDI thread) vs bindings() (any thread)
        self._bindings: dict[Key, tuple[MidiBinding, Target]] = {}
        for b in load_mapping(path, limits):
            self._bindings[b.key] = (b, Target.of(b.address, limits, b.low, b.high))
        self._levels: dict[Key, float] = {}
        self._learned = ""  # the learn request already served
        self._log_limit = LogLimiter()
        self.handled = 0

    def bindings(self) -> list[MidiBinding]:
        with self._lock:
            return [b for b, _ in self._bindings.values()]

    def handle_pending(self, messages: list[Any]) -> None:
        """The messages read from the port together, in order: each fader's newest CC of them
        and every other message (see the module's doc)."""
        if len(messages) > 1 and not self._live().node.midi_learn:
            faders = [self._fader(m) for m in messages]
            newest = {key: i for i, key in enumerate(faders) if key is not None}
            messages = [m for i, (m, key) in enumerate(zip(messages, faders, strict=True))
                        if key is None or newest[key] == i]
        for message in messages:
            self.handle(message)

    def _fader(self, message: Any) -> Key | None:
        """The key of a CC mapped to a continuous parameter; None for anything else."""
        read = _read(message)
        if read is None or read[0][0] != "cc":
            return None
        found = self._bindings.get(read[0])
        return read[0] if found is not None and found[1].param.kind != "trigger" else None

    def handle(self, message: Any) -> None:
        read = _read(message)
        if read is None:
            return
        key, fraction = read
        learning = self._live().node.midi_learn
        if not learning:
            self._learned = ""
        elif fraction > 0.0 and learning != self._learned:
            self._learned = learning  # the knob keeps sending until learn mode's end is applied
            self._learn(key, learning)
            return
        found = self._bindings.get(key)
        if found is None:
            return
        binding, target = found
        previous = self._levels.get(key, 0.0)
        self._levels[key] = fraction
        if target.param.kind == "trigger" and previous >= 0.5:
            return  # a held pad or a CC still up: only the rising edge fires
        try:
            update = target.update(fraction, origin=f"midi:{binding.address}")
        except OscReject as e:
            if (held := self._log_limit(f"midi:{key}")) is not None:
                logger.warning("MIDI %s %d/%d → %s: %s%s", *key, binding.address, e, held_text(held))
            return
        if update is not None:
            self.handled += 1
            self.queue.put(update)

    def _learn(self, key: Key, address: str) -> None:
        try:
            target = Target.of(address, self.limits)
        except ValueError as e:
            logger.warning("MIDI learn: %s", e)
        else:
            binding = MidiBinding(key[0], key[1], key[2], target.address)
            with self._lock:
                self._bindings[key] = (binding, target)
                bindings = [b for b, _ in self._bindings.values()]
            try:
                save_mapping(self.path, bindings)
            except OSError as e:
                logger.warning("MIDI learn: cannot save %s (%s); the mapping holds until the node stops", self.path, e)
            logger.info("MIDI learn: %s channel %d number %d → %s", *key, target.address)
        self.queue.put(Update("midi_learn", "", origin="/midi/learn"))
