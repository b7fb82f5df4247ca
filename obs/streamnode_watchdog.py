"""Cut OBS to a fallback scene when a streamnode node stops, over obs-websocket 5.

    pip install obsws-python
    python obs/streamnode_watchdog.py --fallback-scene "Be right back"

Runs beside OBS (same machine or not). It listens for the node's heartbeat on the reply
port; when no heartbeat has come for --timeout seconds, or the node reports a state other
than streaming/paused, it switches OBS's program scene to --fallback-scene, and back to the
scene it replaced once the node has streamed again for --recover seconds. If the operator
picks a scene during the outage, the watchdog leaves it alone until the node has recovered.
The OBS password is read from the environment (OBS_WEBSOCKET_PASSWORD by default), never
from the command line, where other users could see it.

Inside OBS, streamnode_obs.py does the same without obs-websocket; use one or the other.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from streamnode_obs_core import (
    DEFAULT_NODE_PORT,
    DEFAULT_REPLY_PORT,
    HEARTBEAT_TIMEOUT_S,
    FallbackSwitcher,
    NodeLink,
    NodeMonitor,
    NodeSession,
    ObsWebsocketScenes,
    SceneFallback,
    watch,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamnode_watchdog.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--fallback-scene", required=True, help="OBS scene to show while the node is down")
    p.add_argument("--node-host", default="127.0.0.1", help="the node's host (default 127.0.0.1)")
    p.add_argument("--node-port", type=int, default=DEFAULT_NODE_PORT, help="the node's --osc-port (7000)")
    p.add_argument("--reply-port", type=int, default=DEFAULT_REPLY_PORT,
                   help="port the node replies to: 7001, or the port of its --osc-reply")
    p.add_argument("--prefix", default="", help="the node's --osc-prefix, if any (e.g. /vj1)")
    p.add_argument("--timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                   help="seconds without a heartbeat before the node counts as down (3)")
    p.add_argument("--recover", type=float, default=2.0,
                   help="seconds of streaming before cutting back (2)")
    p.add_argument("--no-restore", action="store_true", help="stay on the fallback scene after recovery")
    p.add_argument("--arm-at-start", action="store_true",
                   help="cut to the fallback even if the node has not been seen since the watchdog started")
    p.add_argument("--obs-host", default="127.0.0.1", help="obs-websocket host (127.0.0.1)")
    p.add_argument("--obs-port", type=int, default=4455, help="obs-websocket port (4455)")
    p.add_argument("--obs-password-env", default="OBS_WEBSOCKET_PASSWORD",
                   help="environment variable holding the obs-websocket password")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        scenes = ObsWebsocketScenes(args.obs_host, args.obs_port, os.environ.get(args.obs_password_env, ""),
                                    password_from=f"the password in ${args.obs_password_env}")
    except RuntimeError as e:
        print(f"streamnode_watchdog: {e}", file=sys.stderr)
        return 2
    prefix = args.prefix.rstrip("/")
    link = NodeLink(args.node_host, args.node_port, args.reply_port)
    if link.listen_error:
        print(f"streamnode_watchdog: {link.listen_error}", file=sys.stderr)
        link.close()
        return 2
    session = NodeSession(link, NodeMonitor(prefix=prefix, timeout_s=args.timeout), prefix=prefix)
    fallback = SceneFallback(args.fallback_scene, restore=not args.no_restore, recover_s=args.recover,
                             arm_at_start=args.arm_at_start)
    print(f"streamnode_watchdog: watching {args.node_host}:{args.node_port} (replies on {link.port}); "
          f"OBS at {scenes.where}, fallback scene {args.fallback_scene!r}. Ctrl+C to stop.", file=sys.stderr)
    stop = threading.Event()
    try:
        watch(session, FallbackSwitcher(fallback, scenes), stop)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
        scenes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
