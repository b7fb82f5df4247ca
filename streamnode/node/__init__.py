"""The daemon: source → ring buffer → engine → per-sink mailboxes → sinks, with metrics and control.

Threads (DESIGN.md; docs/architecture.md), each a worker receiving its stop Event and running
under the guard (guard.py):

- `capture` (capture.py): opens the source (retrying with backoff), fits each frame to the
  output size into the ring buffer, and while the source is away keeps the sinks fed.
- `engine` (engine_loop.py): the only owner of the engine. Applies queued control updates
  between frames (apply.py), runs one engine call per frame and hands the results to the outputs.
- `model-loader` (model_switch.py): builds a new engine on a model switch while the current one
  keeps streaming.
- `present` (presenter.py): with frame_buffer_size > 1 in live mode, spreads each call's
  results over the call period.
- `sink:<uri>` (sinks.py): one per sink, fed by a two-slot mailbox (latest wins).
- the caller's thread runs `Node.run()` (lifecycle.py): watches duration, frame count and the
  end of a finite source, logs metrics, and shuts down in order under a deadline.

The command line (`streamnode run`, `streamnode sources`) is in streamnode/commands/.
"""

from streamnode.node.build import EngineFactory, build_engine
from streamnode.node.lifecycle import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Node, StartupError
from streamnode.node.passthrough import PassThroughEngine

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "EngineFactory",
    "Node",
    "PassThroughEngine",
    "StartupError",
    "build_engine",
]
