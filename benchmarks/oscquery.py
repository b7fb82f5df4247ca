"""OSCQuery cost, printed as JSON (and written to benchmarks/results/oscquery.json).

1. What the OSC sender thread pays per applied change to keep LISTEN clients current:
   `AddressTree.changes()` (reads again only the single addresses and the members whose state
   changed) against reading every method and comparing (what a plain diff costs), interleaved,
   CPU time per change, for 8 and 32 brush slots.
2. What one HTTP request costs to describe: `GET /guidance` (only that method is read) against
   `GET /` (the whole tree), interleaved, CPU time.
3. LISTEN latency: a real `OscServer` with OSCQuery on 127.0.0.1 and N websocket clients that
   LISTEN to `/`; the live state changes (as the engine thread publishes it) and the time until
   every client holds the new value is measured, for 1 and 16 clients. The sender thread looks
   every 20 ms, so about 10 ms is the floor.

Absolute times on a shared machine are noise; the ratios of each interleaved pair are what to
compare. Run from the repository root (needs `pip install -e ".[oscquery]"`):

    python benchmarks/oscquery.py
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.config import OscConfig  # noqa: E402
from streamnode.control.osc import OscServer  # noqa: E402
from streamnode.control.oscquery_tree import AddressTree  # noqa: E402
from streamnode.control.updates import ControlQueue  # noqa: E402
from streamnode.live_params import BrushParams, BrushState, LiveState  # noqa: E402


def with_brushes(n: int) -> LiveState:
    brushes = {i: BrushState(BrushParams(prompt=f"brush {i}", rect=(0.1, 0.1, 0.5, 0.5))) for i in range(n)}
    return LiveState(brushes=brushes, brush_order=tuple(range(n)))


def cpu_ms(fn: Any, rounds: int) -> float:
    t = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - t) / rounds * 1000


def interleaved(a: Any, b: Any, rounds: int = 7, each: int = 20) -> dict[str, float]:
    """Median CPU ms per call of a and b, alternating rounds, and the median of b/a per round."""
    xs, ys = [], []
    for _ in range(rounds):
        xs.append(cpu_ms(a, each))
        ys.append(cpu_ms(b, each))
    return {"a_ms": round(statistics.median(xs), 4), "b_ms": round(statistics.median(ys), 4),
            "b_over_a": round(statistics.median(y / x for x, y in zip(xs, ys, strict=True)), 1)}


def sender_cost(slots: int) -> dict[str, float]:
    tree = AddressTree("/vj1", {"/brush/N": slots})
    base = with_brushes(8)
    states = [base.replace(params=base.params.apply({"guidance_scale": 1.0 + i / 1000})) for i in range(4096)]
    tree.changes(base)
    step = iter(states)
    old = {"readings": tree.readings(base)}

    def plain_diff() -> None:
        now = tree.readings(next(step))
        [path for path, r in now.items() if old["readings"].get(path) != r]
        old["readings"] = now

    result = interleaved(lambda: tree.changes(next(step)), plain_diff)
    return {"changes_ms": result["a_ms"], "read_all_and_compare_ms": result["b_ms"], "ratio": result["b_over_a"]}


def describe_cost() -> dict[str, float]:
    tree = AddressTree("/vj1", {"/brush/N": 8})
    live = with_brushes(4)
    result = interleaved(lambda: tree.describe(live, "/vj1/guidance"), lambda: tree.describe(live, "/"))
    return {"one_method_ms": result["a_ms"], "whole_tree_ms": result["b_ms"], "ratio": result["b_over_a"]}


def listen_latency(clients: int, changes: int = 40) -> dict[str, float]:
    from pythonosc.osc_message import OscMessage
    from websockets.sync.client import connect

    state = {"live": with_brushes(2)}
    server = OscServer(OscConfig(enabled=True, port=0, oscquery_port=0, prefix="/vj1"), ControlQueue(),
                       live=lambda: state["live"], max_brushes=8)
    server.start()
    got: list[dict[str, float]] = [{} for _ in range(clients)]
    closing = contextlib.ExitStack()
    sockets = [closing.enter_context(connect(f"ws://127.0.0.1:{server.oscquery_port}/")) for _ in range(clients)]

    def read(i: int) -> None:
        try:
            while True:
                message = sockets[i].recv()
                if isinstance(message, bytes):
                    msg = OscMessage(message)
                    if msg.address == "/vj1/guidance":
                        got[i][round(msg.params[0], 3)] = time.perf_counter()
        except Exception:
            return

    for i, ws in enumerate(sockets):
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/"}))
        threading.Thread(target=read, args=(i,), daemon=True).start()
    time.sleep(0.5)
    delays = []
    for k in range(changes):
        value = round(2.0 + k / 100, 3)
        live = state["live"]
        t = time.perf_counter()
        state["live"] = live.replace(params=live.params.apply({"guidance_scale": value}))
        deadline = t + 5
        while not all(value in g for g in got) and time.perf_counter() < deadline:
            time.sleep(0.0005)
        delays.append((max(g.get(value, deadline) for g in got) - t) * 1000)
        time.sleep(0.03)
    closing.close()
    server.stop()
    delays.sort()
    return {"clients": clients, "p50_ms": round(delays[len(delays) // 2], 1),
            "p95_ms": round(delays[int(len(delays) * 0.95) - 1], 1), "max_ms": round(delays[-1], 1)}


def main() -> None:
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "sender_per_change_8_slots": sender_cost(8),
        "sender_per_change_32_slots": sender_cost(32),
        "describe_per_request": describe_cost(),
        "listen_latency": [listen_latency(1), listen_latency(16)],
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(__file__).resolve().parent / "results" / "oscquery.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
