"""OSC control speed, printed as JSON (and written to benchmarks/results/control.json).

1. Prompt latency: a /prompt sent over UDP while the engine streams a still picture (tiny
   model, 256², CPU by default). For each trial: how many processed frames, and how many ms,
   from the send to the first output frame that differs (the new prompt in use), and to the
   output settling again (the transition done). Target: the first frame that starts after
   the message arrives is already changed (1 frame), and it settles within the configured
   /prompt_transition frames after that.
2. CHOP traffic cost: engine frames/s with 10,000 msgs/s of TouchDesigner-like OSC traffic
   (every numeric channel sent every cook, two of them moving) against the same traffic sent
   to a socket nobody reads (so the sender's own CPU use is in both). Interleaved rounds,
   medians, and the median of the per-round paired differences. Target: < 5% fewer frames/s.
   On a shared or loaded machine frames/s swing more than that between rounds, so the CPU
   the OSC threads use is measured too (Linux): their share of the whole process's CPU time
   is what the engine loses when it is CPU-bound, and it does not depend on the neighbours.
   Also: ms from a UDP send to the update waiting in the queue.
3. Per-message cost of the receive path (no sockets): µs per message for a repeated value
   (dropped by dedupe), a changed value (parsed, validated, queued) and a bad one (rejected).

The engine loop here is the node's: drain the ControlQueue between frames, apply, echo. Run
from the repository root:

    python benchmarks/control.py                 # 256², tiny, CPU
    python benchmarks/control.py --size 64 --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pythonosc.osc_message_builder import OscMessageBuilder  # noqa: E402

from streamnode.config import OscConfig  # noqa: E402
from streamnode.control.osc import ADDRESSES, OscServer  # noqa: E402
from streamnode.control.updates import ENGINE_KEYS, ControlQueue  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

PROMPTS = ["a watercolor city at night", "a field of sunflowers", "a neon robot", "an ink drawing of a cat"]


def message(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for a in args:
        builder.add_arg(a)
    return builder.build().dgram


class EngineLoop:
    """The node's engine thread in miniature: updates between frames, one engine call per frame."""

    def __init__(self, engine: StreamEngine, queue: ControlQueue, frame: np.ndarray) -> None:
        self.engine, self.queue, self.frame = engine, queue, frame
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []  # i, t0, t1, applied keys, output
        self.keep_outputs = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="bench-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            keys = []
            for update in self.queue.drain():
                if update.key in ENGINE_KEYS:
                    self.engine.update(**{update.key: update.value})
                keys.append(update.key)
                self.queue.report(update)
            out = self.engine(self.frame)
            t1 = time.perf_counter()
            with self.lock:
                self.records.append({"i": i, "t0": t0, "t1": t1, "applied": keys,
                                     "out": out if self.keep_outputs else None})
                if len(self.records) > 400:
                    del self.records[:200]
            i += 1

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)

    def wait_frames(self, n: int, timeout: float = 300.0) -> None:
        start = self.snapshot()[-1]["i"] if self.records else -1
        deadline = time.monotonic() + timeout
        while (self.snapshot()[-1]["i"] if self.records else -1) < start + n:
            if time.monotonic() > deadline:
                raise TimeoutError("the engine stopped producing frames")
            time.sleep(0.005)

    def wait_steady(self, timeout: float = 300.0) -> np.ndarray:
        """Until the last 2 outputs are equal (a still input, no change in flight)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.snapshot()
            if len(recs) >= 2 and np.array_equal(recs[-1]["out"], recs[-2]["out"]) and not recs[-1]["applied"]:
                return recs[-1]["out"]
            if time.monotonic() > deadline:
                raise TimeoutError("output never settled")
            time.sleep(0.005)


def prompt_latency(loop: EngineLoop, port: int, trials: int, transition: int, frame_ms: float) -> list[dict[str, Any]]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(message("/prompt_transition", transition), ("127.0.0.1", port))
    loop.wait_frames(2)
    results = []
    for k in range(trials):
        steady = loop.wait_steady()
        time.sleep(random.uniform(0, frame_ms / 1000))  # land anywhere inside a frame
        prompt = f"{PROMPTS[k % len(PROMPTS)]} {transition}/{k}"
        t_send = time.perf_counter()
        sender.sendto(message("/prompt", prompt), ("127.0.0.1", port))
        loop.wait_frames(transition + 4)
        settled = loop.wait_steady()
        recs = [r for r in loop.snapshot() if r["t1"] > t_send]
        changed = next(r for r in recs if not np.array_equal(r["out"], steady))
        started_after = [r for r in recs if r["t0"] >= t_send]
        applied = next(r for r in recs if "prompt" in r["applied"])
        last_change = max(r["i"] for r in recs if r["i"] > 0 and not np.array_equal(r["out"], settled))
        first_after = started_after[0]["i"]
        results.append({
            "transition_frames": transition,
            "frames_to_first_changed_output": changed["i"] - first_after + 1,  # 1 = the next frame started
            "ms_to_first_changed_output": round((changed["t1"] - t_send) * 1e3, 1),
            "frames_to_settled_output": last_change - first_after + 2,
            "applied_in_frame_that_changed": applied["i"] == changed["i"],
        })
    sender.close()
    return results


SENDER = r"""
import math, socket, sys, time
from pythonosc.osc_message_builder import OscMessageBuilder
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
channels = sys.argv[4].split(",")
def msg(address, value):
    b = OscMessageBuilder(address); b.add_arg(float(value), "f"); return b.build().dgram
constant = [msg(a, v) for a, v in (c.split("=") for c in channels)]
cook_rate = rate / (len(constant) + 2)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.perf_counter(); cook = 0; sent = 0
while (now := time.perf_counter()) - t0 < seconds:
    due = int((now - t0) * cook_rate)
    while cook < due:  # TouchDesigner sends every channel on every cook
        g = round(1.2 + 0.5 * math.sin(cook / 40), 3)  # two channels moving, like a slider / LFO
        d = round(0.8 + 0.2 * math.cos(cook / 55), 3)
        for data in (msg("/guidance", g), msg("/delta", d), *constant):
            s.sendto(data, ("127.0.0.1", port)); sent += 1
        cook += 1
    time.sleep(0.0005)
print(sent)
"""


def chop_channels(engine: StreamEngine) -> list[str]:
    """Every numeric address a CHOP would drive, holding the value the engine already uses
    (a held /similarity 0.98 would switch the similarity filter on and skip frames of the
    still test picture, which is not what is measured here)."""
    channels = []
    for p in ADDRESSES:
        if p.kind != "value" or len(p.args) != 1 or p.args[0].tag == "s" or p.repeat != (1, 1):
            continue
        if p.address in ("/guidance", "/delta", "/strength"):  # the two moving ones are sent apart
            continue
        for n in range(8) if p.is_brush else [None]:
            value = getattr(engine.params, p.key or "", None)
            if not isinstance(value, (int, float)):
                value = p.default if isinstance(p.default, (int, float)) else p.args[0].min
            channels.append(f"{p.address.replace('/N/', f'/{n}/')}={float(value)}")
    return channels


def thread_cpu_s(native_ids: list[int]) -> float | None:
    """CPU seconds (user + system) of some threads of this process; Linux only."""
    total = 0.0
    try:
        for tid in native_ids:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def traffic_cost(loop: EngineLoop, server: OscServer, rate: float, window: float, rounds: int) -> dict[str, Any]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read: the kernel drops
    sink.bind(("127.0.0.1", 0))
    channels = ",".join(chop_channels(loop.engine))
    loop.keep_outputs = False
    fps: dict[str, list[float]] = {"baseline": [], "osc": []}
    received: list[float] = []
    osc_ids = [t.native_id for t in server._threads if t.native_id is not None]
    cpu_share: list[float] = []  # OSC threads' CPU / the whole process's CPU, during OSC windows
    osc_core: list[float] = []  # OSC threads' CPU seconds per wall second
    load: list[float] = []
    for _ in range(rounds):
        for cond in ("baseline", "osc"):
            port = sink.getsockname()[1] if cond == "baseline" else server.port
            before = server.stats()
            proc = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(rate), str(window + 1.5), channels],
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(0.75)  # the sender is up and at rate
            osc0, proc0 = thread_cpu_s(osc_ids), process_cpu_s()
            t0 = time.perf_counter()
            time.sleep(window)
            t1 = time.perf_counter()
            osc1, proc1 = thread_cpu_s(osc_ids), process_cpu_s()
            if hasattr(os, "getloadavg"):
                load.append(os.getloadavg()[0])
            if cond == "osc" and osc0 is not None and osc1 is not None:
                cpu_share.append((osc1 - osc0) / max(1e-9, proc1 - proc0))
                osc_core.append((osc1 - osc0) / (t1 - t0))
            done = [r["t1"] for r in loop.snapshot() if t0 <= r["t1"] <= t1]
            proc.wait(30)
            # Frame completions inside the window: (n − 1) intervals, not a count over a
            # window edge, so a 3 fps engine still gets a fine-grained figure.
            fps[cond].append((len(done) - 1) / (done[-1] - done[0]))
            if cond == "osc":
                after = server.stats()
                received.append((after["datagrams"] - before["datagrams"]) / (window + 1.5))
    sink.close()
    loop.keep_outputs = True
    base, osc = statistics.median(fps["baseline"]), statistics.median(fps["osc"])
    paired = [100 * (b - o) / b for b, o in zip(fps["baseline"], fps["osc"], strict=True)]
    stats = server.stats()
    return {
        "rate_msgs_per_s": rate,
        "channels": len(channels.split(",")) + 2,
        "received_msgs_per_s_median": round(statistics.median(received)),
        "fps_baseline_median": round(base, 3),
        "fps_with_osc_median": round(osc, 3),
        "fps_rounds": {k: [round(v, 3) for v in vs] for k, vs in fps.items()},
        "throughput_cost_percent": round(100 * (base - osc) / base, 2),
        "throughput_cost_percent_paired_rounds": [round(c, 2) for c in paired],
        "throughput_cost_percent_paired_median": round(statistics.median(paired), 2),
        "osc_threads_core_percent_median": round(100 * statistics.median(osc_core), 2) if osc_core else None,
        "osc_threads_share_of_process_cpu_percent_median":
            round(100 * statistics.median(cpu_share), 2) if cpu_share else None,
        "load_average_1min": [round(x, 2) for x in load],
        "server_counters": stats,
    }


def osc_to_queue(server: OscServer, queue: ControlQueue, n: int) -> dict[str, float]:
    """ms from a UDP send to the typed update waiting in the queue (the server's own latency)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        sender.sendto(message("/guidance", 1.0 + k / 1000), ("127.0.0.1", server.port))
        while not len(queue):
            time.sleep(0)  # yield the GIL: a pure-Python spin would hold it for the 5 ms switch interval
        times.append((time.perf_counter() - t0) * 1e3)
        queue.drain()
    sender.close()
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p95_ms": round(times[int(0.95 * n)], 3)}


def per_message_cost(n: int) -> dict[str, Any]:
    queue = ControlQueue()
    server = OscServer(OscConfig(port=0), queue)  # not started: _on_datagram called directly
    repeated = message("/guidance", 1.5)
    changing = [message("/guidance", round(1 + i / 1000, 3)) for i in range(1000)]
    bad = message("/guidance", 99.0)
    logging.getLogger("streamnode.control.osc").setLevel(logging.ERROR)
    out = {}
    for name, data in (("repeated_value_deduped", [repeated] * 1000), ("changed_value_queued", changing),
                       ("bad_value_rejected", [bad] * 1000)):
        t0 = time.perf_counter()
        for _ in range(n // 1000):
            for d in data:
                server._on_datagram(d, "127.0.0.1")
            queue.drain()
            server._outbox.clear()
        us = (time.perf_counter() - t0) / n * 1e6
        out[name] = {"us_per_msg": round(us, 2), "core_percent_at_10k_per_s": round(us * 10_000 / 1e6 * 100, 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t-index", type=int, nargs="+", default=[32, 45])
    parser.add_argument("--trials", type=int, default=4, help="prompt changes per transition setting")
    parser.add_argument("--transitions", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--rate", type=float, default=10_000.0, help="OSC messages per second")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per throughput window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer trials and shorter windows")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "control.json"))
    args = parser.parse_args()
    if args.quick:
        args.trials, args.window, args.rounds = 2, 3.0, 1
    logging.basicConfig(level=logging.WARNING)
    random.seed(0)

    engine = StreamEngine.from_pretrained(args.model, device=args.device, t_index_list=args.t_index,
                                          width=args.size, height=args.size, cfg_type="none",
                                          similarity_threshold=0.0)
    engine.prepare(prompt=PROMPTS[0])
    frame = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)

    queue = ControlQueue()
    server = OscServer(OscConfig(port=0), queue)
    server.start()
    loop = EngineLoop(engine, queue, frame)
    try:
        to_queue = osc_to_queue(server, queue, 200)
        loop.start()
        loop.wait_frames(8)
        frame_ms = statistics.median(r["t1"] - r["t0"] for r in loop.snapshot()[-6:]) * 1e3
        latency = []
        for transition in args.transitions:
            latency += prompt_latency(loop, server.port, args.trials, transition, frame_ms)
        traffic = traffic_cost(loop, server, args.rate, args.window, args.rounds)
    finally:
        loop.stop()
        server.stop()
    summary = {}
    for transition in args.transitions:
        rows = [r for r in latency if r["transition_frames"] == transition]
        summary[f"transition_{transition}"] = {
            "frames_to_first_changed_output_max": max(r["frames_to_first_changed_output"] for r in rows),
            "ms_to_first_changed_output_median": statistics.median(r["ms_to_first_changed_output"] for r in rows),
            "frames_to_settled_output_max": max(r["frames_to_settled_output"] for r in rows),
        }
    result = {
        "benchmark": "control",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "device": args.device},
        "model": args.model, "size": args.size, "t_index_list": args.t_index,
        "engine_ms_per_frame": round(frame_ms, 1),
        "osc_to_queue": to_queue,
        "prompt_latency": {"summary": summary, "trials": latency},
        "chop_traffic": traffic,
        "receive_path": per_message_cost(100_000 if not args.quick else 20_000),
    }
    text = json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
