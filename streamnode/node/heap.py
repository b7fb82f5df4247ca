"""The interpreter's heap, kept out of the picture's way: what a node has built by its first
frame is frozen, so a full garbage collection never stops the frames.

CPython's collector stops every thread while it runs, and a full pass walks every tracked
object. A node's start-up heap (torch, diffusers, the model: about 450k objects) took one pass
190-270 ms on 2 cores; one that fell in a model switch made a 360 ms gap in the output
(benchmarks/model_switch.py counts the passes). `gc.freeze()` moves what is alive into a
generation no pass visits: after it, a full pass with a second model loaded took about 2 ms.

A frozen object is freed only by its reference count, never as part of a garbage cycle, so the
heap is frozen once, at the first frame: what is made later (a model loaded by a switch, a LoRA)
stays with the collector, and the one frozen thing a show replaces, the first engine, sits in no
cycle (`StreamEngine.close()`), so a switch frees its model at once. After a switch the
collector runs once (`collect_after_switch`: a few ms over what is not frozen), so whatever
the load left as garbage goes at a frame boundary rather than at a random later one.

Freezing is process-wide: the process that owns the node turns it on (`Node(freeze_heap=True)`,
as `streamnode run` does); a node embedded in a larger program (a test, a notebook) leaves the
collector as it is.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def settle() -> None:
    """Collect what is garbage now and freeze what is alive (engine thread, after a new node's
    first call, before its first frame leaves)."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug("heap frozen in %.0f ms: %d objects", (time.perf_counter() - t0) * 1e3, gc.get_freeze_count())


def collect_after_switch() -> None:
    """One full pass over what is not frozen (engine thread, right after a model switch)."""
    t0 = time.perf_counter()
    found = gc.collect()
    logger.debug("collected %d objects after the switch in %.1f ms", found, (time.perf_counter() - t0) * 1e3)
