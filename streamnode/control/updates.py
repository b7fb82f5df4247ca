"""Typed live-parameter updates and the queue that carries them to the engine thread.

Producers (the OSC server, the CLI, tests) `put()` updates; the engine thread `drain()`s them
between frames, applies them, and `report()`s each outcome (applied, or the reason it was not)
to the `on_report` listeners, so a control surface can echo, forget its dedupe memory or show
the error. The values in force are not kept here: the engine and the node report them
(`LiveState`, live_params.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamnode.live_params import GROUPS, LiveParams, NodeParams

ENGINE_KEYS = frozenset({*LiveParams.model_fields, "brush_order"})
"""Keys the node forwards to `Engine.update(**{key: value})` (the schema's LiveParams, plus the brush order)."""

_GROUP_NAMES = frozenset(g.name for g in GROUPS)

STATES = ("starting", "loading_model", "building_engine", "warming_up", "streaming", "paused", "error")
"""The node's lifecycle states: `Node.status()["state"]`, reported as /streamnode/state."""

NODE_KEYS = frozenset({*NodeParams.model_fields, *(g.name for g in GROUPS), "cue_next", "downbeat"})
"""Keys the node handles itself (the schema's NodeParams; the indexed groups', brush and lora, whose
values are `(index, field, value)` tuples, field a BrushParams / LoraParams field or "clear")."""


@dataclass(frozen=True, slots=True)
class Update:
    key: str
    value: Any
    origin: str = ""  # the OSC address (or "cli") it came from, echoed back as applied/<origin>
    quantize: str = ""  # a grid of its own (/at/<grid>/<address>): held until then; "" follows /quantize
    at: float = field(default_factory=time.monotonic, compare=False)
    """When it arrived: a quantized change waits for the grid line after its arrival (node/tempo.py)."""

    @property
    def slot(self) -> str:
        """What a newer update replaces: the key, or the (index, field) pair in an indexed group."""
        if self.key in _GROUP_NAMES:
            # (index, field, value); (index, {field: value, ...}), a whole entry (a preset's), is "*".
            field = self.value[1] if isinstance(self.value[1], str) else "*"
            return f"{self.key}/{self.value[0]}/{field}"
        return self.key


class ControlQueue:
    """Bounded, never-blocking, latest-wins per key.

    A control surface that sends the same channel every cook would otherwise fill the queue:
    a newer update for the same key replaces the pending one, so the engine applies at most one
    value per key per frame, in the order the values in force arrived.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Update] = {}
        self._listeners: list[Callable[[Update, str | None], None]] = []
        self.replaced = 0

    def put(self, update: Update) -> None:
        with self._lock:
            # A newer value replaces the waiting one and takes its turn at the end: updates apply
            # in the order their values arrived (a preset, then a prompt sent after it: the prompt
            # stays; a brush cleared, then painted again: it exists).
            if self._pending.pop(update.slot, None) is not None:
                self.replaced += 1
            self._pending[update.slot] = update

    def drain(self) -> list[Update]:
        with self._lock:
            if not self._pending:
                return []
            updates = list(self._pending.values())
            self._pending.clear()
            return updates

    def pending(self, slot: str) -> Update | None:
        """The update waiting for `slot` (see `Update.slot`), if any."""
        with self._lock:
            return self._pending.get(slot)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def on_report(self, listener: Callable[[Update, str | None], None]) -> None:
        """Register `listener(update, error)`, run on the engine thread (it must not block) for each
        drained update: error None when it was applied, else the reason it was not."""
        self._listeners.append(listener)

    def report(self, update: Update, error: str | None = None) -> None:
        for listener in self._listeners:
            listener(update, error)
