"""Background work that leaves the interpreter to the engine thread: model, LoRA and ControlNet
loads (node/model_switch.py, node/lora_loader.py) run inside `sharing_the_interpreter()`."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

SHARE_QUANTUM_S = 0.0001
SHARE_REST_S = 0.0004
"""While loading, the loader gives the interpreter away for REST after every QUANTUM it ran: the
engine thread keeps most of it (see `sharing_the_interpreter`)."""


@contextlib.contextmanager
def sharing_the_interpreter(quantum: float = SHARE_QUANTUM_S, rest: float = SHARE_REST_S) -> Iterator[None]:
    """Make this thread (a background load) leave the interpreter to the others at a steady rate.

    A model load is mostly Python (building modules, reading configs), and an eager engine call
    needs the interpreter between its torch ops. CPython hands the interpreter lock to a waiting
    thread only after its switch interval (5 ms): a thread busy in Python beside the engine made
    each tiny-model call 14-22x slower (2.2-2.8 s instead of 0.12-0.16 s, measured on 2 cores).
    A per-thread profile hook (`sys.setprofile` acts on the calling thread only) sleeps `rest`
    after each `quantum` of this thread's time, and a sleep releases the lock at once. The
    engine waits, at an op that finds the lock taken, for the rest of a quantum, so the quantum
    is short: beside a pure-Python neighbour a call took 141-143 ms with 0.5 ms / 2 ms and
    127-134 ms with 0.1 ms / 0.4 ms (103-130 ms alone), while the neighbour got as far. The load
    takes longer; the picture keeps its pace (docs/architecture.md, "A model switch").
    """
    previous = sys.getprofile()
    last = time.perf_counter()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= quantum:
            time.sleep(rest)
            last = time.perf_counter()

    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(previous)
