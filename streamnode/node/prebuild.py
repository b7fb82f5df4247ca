"""A model switch's missing accelerated models, built in another process.

Switching to a model whose OpenVINO models (or TensorRT engines) are not in the engine cache
means converting it first: tracing the UNet and OpenVINO's PyTorch frontend are mostly Python,
and hold the interpreter for up to about 200 ms at a time. On the loader thread, even while it
shares the interpreter (node/interpreter_share.py), converting the tiny UNet took 34 s and froze
the picture for a second. A child process has an interpreter of its own: it builds the engine
for the same config (`build_engine`, so the same cache keys), which leaves every model it needs
in the cache, and exits; the loader then imports them from the cache, as on any later switch.
The child runs at the lowest CPU priority, on what the node leaves idle.

The loader runs it only for a miss (`accel.cache.misses_filled_by`), once per load. The child
ends with the load: when the node stops, when a newer request supersedes the load, or when
the node's process dies (it watches its stdin, which only the node holds open).

The child is `main()` below, given a NodeConfig as JSON on the first line of its stdin.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO

from streamnode.accel.cache import BuildAbandoned
from streamnode.config import NodeConfig

logger = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the loader looks whether the load is still wanted while the child builds."""
KEEP_LINES = 20
"""The child's last log lines kept for the error message when it fails."""
CHILD = "from streamnode.node.prebuild import main; raise SystemExit(main())"
"""The child's program (not `-m`: the package's own import of this module would come first)."""


class PrebuildFailed(RuntimeError):
    """The child did not finish its build; the message has its exit status and last lines (the
    loader then builds in the node, as without a child)."""


class Prebuild:
    """One load's build in a child process: `__call__` runs it once and remembers the outcome (so
    every cache miss of the load may call it), raising PrebuildFailed when it failed."""

    def __init__(self, config: NodeConfig, abandoned: Callable[[], bool]) -> None:
        self.config = config
        self.abandoned = abandoned  # the load is no longer wanted: the child is stopped
        self._ran = False
        self._failure: Exception | None = None

    def __call__(self) -> None:
        if not self._ran:
            self._ran = True
            try:
                self._run()
            except (PrebuildFailed, BuildAbandoned) as e:
                self._failure = e
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        model = self.config.model.id
        logger.info("model %s: building its accelerated models in another process (the picture goes on)", model)
        flags = getattr(subprocess, "IDLE_PRIORITY_CLASS", 0)  # Windows; elsewhere the child lowers itself
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, encoding="utf-8", errors="replace", creationflags=flags,
        )
        assert child.stdin is not None and child.stderr is not None
        lines: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
        relay = threading.Thread(target=_relay, args=(child.stderr, lines), name="prebuild-log", daemon=True)
        relay.start()
        try:
            child.stdin.write(self.config.model_dump_json() + "\n")
            child.stdin.flush()  # stdin stays open: the child ends when it closes
            while True:
                try:
                    code = child.wait(POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.abandoned():  # the load ends too: nothing is converted in the node
                        raise BuildAbandoned("the load was abandoned") from None
        except OSError as e:  # the child died before reading its config
            raise PrebuildFailed(f"the build process could not start: {e}") from None
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            with contextlib.suppress(OSError):
                child.stdin.close()
            relay.join(1.0)
        if code != 0:
            tail = " | ".join(lines) or "no output"
            raise PrebuildFailed(f"the build process exited with {code}: {tail}")


def _relay(stream: IO[str], lines: collections.deque[str]) -> None:
    """The child's log lines into the node's log (its progress is the user's too), until it ends."""
    try:
        for line in stream:
            line = line.rstrip()
            if line:
                lines.append(line)
                logger.info("prebuild: %s", line)
    except (OSError, ValueError) as e:  # the pipe went away: the child is gone or being stopped
        logger.debug("prebuild: stopped reading the build process's log (%s)", e)


def _exit_with_parent() -> None:
    """End this process when stdin closes: the node is done with it, or gone."""
    sys.stdin.read()
    os._exit(3)


def main() -> int:
    if hasattr(os, "nice"):
        os.nice(19)  # threads made from here on (torch's, OpenVINO's) inherit it
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    config = NodeConfig.model_validate_json(sys.stdin.readline())
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    from streamnode.node.build import build_engine

    engine = build_engine(config)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
