"""The guard every node thread runs under: no thread dies silently.

An unexpected exception in a worker is logged with its traceback (the first time; a repeat of
the same error is one line), and then either the worker starts again after a pause
(`restart=True`: capture, sinks, the presenter: their next run reopens what they use) or the
node is told it cannot go on (`on_fatal`: the node goes to the `error` state, says so over OSC
and stops with exit code 1). A worker that keeps failing (5 times within a minute) is fatal too:
restarting it for ever would hide a broken node behind a `streaming` state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

RESTART_PAUSE_S = 1.0
RESTARTS_PER_MINUTE = 5


def run_guarded(
    name: str,
    work: Callable[[threading.Event], None],
    stop: threading.Event,
    *,
    on_fatal: Callable[[str], None],
    restart: bool,
) -> None:
    """Run `work(stop)` until it returns, restarting it after an unexpected exception if `restart`."""
    failures: deque[float] = deque(maxlen=RESTARTS_PER_MINUTE)
    last_error = ""
    while not stop.is_set():
        try:
            work(stop)
            return
        except Exception as e:  # noqa: BLE001 - this is the guard: every error is reported here
            text = f"{type(e).__name__}: {e}"
            if text != last_error:
                logger.exception("thread %s failed", name)
            else:
                logger.error("thread %s failed again: %s", name, text)
            last_error = text
            if not restart:
                on_fatal(f"thread {name} failed: {text}")
                return
            now = time.monotonic()
            failures.append(now)
            if len(failures) == failures.maxlen and now - failures[0] < 60.0:
                on_fatal(f"thread {name} failed {len(failures)} times within a minute: {text}")
                return
            logger.warning("thread %s restarts in %.0f s", name, RESTART_PAUSE_S)
            stop.wait(RESTART_PAUSE_S)


def spawn_guarded(
    name: str,
    work: Callable[[threading.Event], None],
    stop: threading.Event,
    *,
    on_fatal: Callable[[str], None],
    restart: bool,
) -> threading.Thread:
    """Start a daemon thread running `work` under the guard. Daemon: a thread stuck in a driver
    call must not keep the process alive after the shutdown deadline."""
    thread = threading.Thread(
        target=run_guarded, args=(name, work, stop), kwargs={"on_fatal": on_fatal, "restart": restart},
        name=name, daemon=True,
    )
    thread.start()
    return thread
