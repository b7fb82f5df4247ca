"""Planning LoRA edits off the engine thread: reading a LoRA file, concatenating or merging factors.

A new `/lora/N/source` (a file to read) and, in merged mode, any change of the stack (weights to
merge) are heavy. The engine thread hands them to the `lora-loader` thread, which runs
`Engine.prepare_lora()` (safe beside frames: it changes nothing), and takes each plan back
between two frames to commit it (`update(lora=plan)`), reporting the update applied or refused
(node/apply.py). Meanwhile the stream goes on with the stack in force.

Light edits (a runtime-mode weight, on/off, clear) apply at once on the engine thread, unless
heavy ones are still waiting: then they queue behind them, so edits apply in the order they came.
The same loader, as the `controlnet-loader` thread, loads ControlNets (`Engine.prepare_controlnet()`,
a new `/controlnet/N/model`). One plan at a time, and the next is made only after the engine thread committed the last
(`committed()`), so each plan is made on the stack the previous one left. A newer edit of the
same (index, field) replaces a queued one (a fader's intermediate values are never merged).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from streamnode.control.updates import Update
from streamnode.engine import Engine
from streamnode.node.interpreter_share import sharing_the_interpreter

logger = logging.getLogger(__name__)


@dataclass
class LoraJob:
    update: Update
    engine: Engine  # the engine the plan is made for
    edit: tuple[Any, ...]  # (index, field, value) or (index, {field: value, ...})


@dataclass
class Planned:
    job: LoraJob
    plan: Any = None
    error: str = ""


class LoraLoader:
    """Plans heavy LoRA edits (or, with `group="controlnet"`, ControlNet loads) on its own thread;
    the engine thread polls `take()` between frames."""

    def __init__(self, group: str = "lora") -> None:
        self.group = group
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, LoraJob] = OrderedDict()
        self._done: list[Planned] = []
        self._uncommitted = False  # a plan was handed over and not yet committed
        self._working = False  # a plan is being made
        self._thread: threading.Thread | None = None
        self._closed = False
        self.replaced = 0

    def busy(self) -> bool:
        """Edits are waiting, being planned, or planned and not committed yet."""
        with self._cond:
            return bool(self._pending or self._done or self._uncommitted or self._working)

    def request(self, job: LoraJob) -> None:
        """Queue a job (engine thread); a queued job of the same slot is replaced."""
        with self._cond:
            if self._closed:
                return
            if self._pending.pop(job.update.slot, None) is not None:
                self.replaced += 1
            self._pending[job.update.slot] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name=f"{self.group}-loader", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self) -> list[Planned]:
        """Finished plans (or failures), oldest first (engine thread). Call `committed()` once they
        are applied: the next plan waits for it."""
        with self._cond:
            done, self._done = self._done, []
            if done:
                self._uncommitted = True
            return done

    def committed(self) -> None:
        """The plans taken were applied (engine thread): the next may be made."""
        with self._cond:
            if self._uncommitted:
                self._uncommitted = False
                self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._pending or self._uncommitted or self._done):
                    self._cond.wait(0.5)
                if self._closed:
                    return
                _, job = self._pending.popitem(last=False)
                self._working = True
            try:
                prepare = job.engine.prepare_lora if self.group == "lora" else job.engine.prepare_controlnet
                with sharing_the_interpreter():  # reading a file, building a net: mostly Python
                    result = Planned(job, plan=prepare(job.edit))
            except Exception as e:  # noqa: BLE001 - a bad LoRA or ControlNet is reported, never fatal
                logger.debug("%s edit %s failed to plan", self.group, job.edit, exc_info=True)
                result = Planned(job, error=str(e) or type(e).__name__)
            with self._cond:
                self._working = False
                self._done.append(result)

    def close(self, timeout: float) -> None:
        """No more plans; waits up to `timeout` s for one being made."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
