"""Typed live-parameter updates and the queue that carries them to the engine thread.

Producers (the OSC server, the CLI, tests) `put()` validated updates; the engine thread
`drain()`s them between frames, applies them, and reports each applied value back through
the `on_applied` callbacks so control surfaces can show what the node really uses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENGINE_KEYS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "prompt_blend",  # list[tuple[str, float]]
        "prompt_transition_frames",
        "guidance_scale",
        "delta",
        "strength",
        "t_index_list",
        "seed",
        "seed_blend",  # list[tuple[int, float]]
        "similarity_threshold",
        "similarity_max_skip",
        "brush_order",  # list[int]: brush numbers, bottom first
    }
)
"""Keys the node forwards to `StreamEngine.update(**{key: value})`."""

STATES = ("starting", "loading_model", "building_engine", "warming_up", "streaming", "paused", "error")
"""The node's lifecycle states: `Node.status()["state"]`, reported as /streamnode/state."""

NODE_KEYS = frozenset({"pause", "bypass", "preset", "model", "brush"})
"""Keys the node handles itself (brush values are `(index, field, value)` tuples)."""


@dataclass(frozen=True, slots=True)
class Update:
    key: str
    value: Any
    origin: str = ""  # the OSC address (or "cli") it came from, echoed back as applied/<origin>

    @property
    def slot(self) -> str:
        """What a newer update replaces: the key, or the (brush, field) pair for brush edits."""
        if self.key == "brush":
            return f"brush/{self.value[0]}/{self.value[1]}"
        return self.key


class ControlQueue:
    """Bounded, never-blocking, latest-wins per key.

    A control surface that sends the same channel every cook would otherwise fill the queue:
    a newer update for the same key replaces the pending one, so the engine applies at most one
    value per key per frame, in the order keys were first queued.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Update] = {}
        self._listeners: list[Callable[[Update], None]] = []
        self.replaced = 0

    def put(self, update: Update) -> None:
        with self._lock:
            if update.slot in self._pending:
                self.replaced += 1
            # Reassigning keeps the slot's first-queued position in the dict's order.
            self._pending[update.slot] = update

    def drain(self) -> list[Update]:
        with self._lock:
            if not self._pending:
                return []
            updates = list(self._pending.values())
            self._pending.clear()
            return updates

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def on_applied(self, listener: Callable[[Update], None]) -> None:
        """Register a callback run (on the engine thread; it must not block) for each applied update."""
        self._listeners.append(listener)

    def applied(self, update: Update) -> None:
        for listener in self._listeners:
            listener(update)
