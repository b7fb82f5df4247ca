"""On the beat, and what control costs: the node on the tiny model (the real engine) following
a simulated clock (the internal clock at a known origin: every beat's time is known exactly).

1. Beat accuracy: one quantized change per beat (`/at/beat/guidance`, sent mid-beat) for
   `--beats` beats; for each, how far from its beat the first frame computed with it left the
   node (a sink stamps each frame as it is sent). With the lookahead (the engine's measured call
   time) and without it, alternating beat by beat in the same run. Goal: with the lookahead,
   every first frame within one engine call of its beat.
2. Update cost: frames/s with no control traffic ("idle"), with a thread waking 1,000 times a
   second and sending nothing ("tick": the same wake-ups), and with 1,000 updates a second
   (MIDI CCs through the mapper, Art-Net packets over UDP to the node's receiver, two LFOs:
   "storm"), in rotating phases of `--phase-s` seconds on the same node. The cost of the updates
   is storm against tick. Goal: < 5 % fewer frames/s.

    python benchmarks/tempo.py --out benchmarks/results/tempo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.config import load_config  # noqa: E402
from streamnode.control.artnet import artdmx  # noqa: E402
from streamnode.control.midi import MidiMapper  # noqa: E402
from streamnode.control.updates import Update  # noqa: E402
from streamnode.io import base  # noqa: E402
from streamnode.node import Node  # noqa: E402
from streamnode.tempo.clock import InternalClock  # noqa: E402


class Stamps:
    """A sink that keeps when each frame left the node."""

    times: list[float] = []
    uri = "stamps://"
    pace_fps = None

    @classmethod
    def from_uri(cls, uri: str, target: str, params: Any, options: Any) -> Stamps:
        return cls()

    def open(self) -> None:
        pass

    def send(self, frame: Any) -> None:
        Stamps.times.append(time.monotonic())

    def close(self) -> None:
        pass


def config(size: int) -> Any:
    return load_config(overrides={
        "source.uri": "test://moving?fps=60", "sinks": ["stamps://"], "stream.width": size, "stream.height": size,
        "stream.t_index_list": [35], "stream.cfg_type": "none", "stream.similarity_threshold": 0.0,
        "stream.prompt_transition_frames": 0, "osc.enabled": False, "runtime.metrics_interval_s": 600.0,
        "model.accel": "eager", "artnet.enabled": True, "artnet.host": "127.0.0.1", "artnet.port": 0,
        "artnet.channels": [{"channel": 1, "address": "/delta"}],
    })


def summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50_ms": round(1e3 * statistics.median(s), 2),
            "p95_ms": round(1e3 * s[int(0.95 * (len(s) - 1))], 2), "min_ms": round(1e3 * s[0], 2),
            "max_ms": round(1e3 * s[-1], 2)}


def beat_accuracy(node: Node, clock: InternalClock, beats: int) -> dict[str, Any]:
    applied: list[tuple[float, float]] = []  # (value, time applied)
    node.queue.on_report(lambda u, e: applied.append((u.value, time.monotonic())) if u.key == "guidance_scale" else None)
    real_lookahead = node.tempo.lookahead_s
    errors: dict[str, list[float]] = {"lookahead": [], "none": []}
    calls: list[float] = []
    beat_s = 60.0 / clock.bpm
    for i in range(beats):
        mode = "lookahead" if i % 2 == 0 else "none"
        node.tempo.lookahead_s = real_lookahead if mode == "lookahead" else (lambda: 0.0)  # type: ignore[method-assign]
        now = time.monotonic()
        time.sleep(((0.5 - clock.at(now).beat % 1.0) % 1.0) * beat_s)  # mid-beat
        t_sent = time.monotonic()
        look = node.tempo.lookahead_s()
        line = clock.at(t_sent + look).beat // 1 + 1
        t_line = t_sent + clock.at(t_sent).seconds_to(line)
        value = 1.0 + (i % 7)
        if node.live().params.guidance_scale == value:
            value += 0.5
        applied.clear()  # only this change's report counts
        node.queue.put(Update("guidance_scale", value, origin="/guidance", quantize="beat"))
        deadline = time.monotonic() + 3 * beat_s
        t_apply = None
        while time.monotonic() < deadline and t_apply is None:
            t_apply = next((t for v, t in reversed(applied) if v == value), None)
            time.sleep(0.001)
        if t_apply is None:
            continue
        out = None
        while time.monotonic() < deadline and out is None:
            out = next((t for t in Stamps.times[-50:] if t > t_apply), None)
            time.sleep(0.001)
        if out is not None:
            errors[mode].append(out - t_line)
            calls.append(node.engine_ms / 1e3)
    node.tempo.lookahead_s = real_lookahead  # type: ignore[method-assign]
    call = statistics.median(calls)
    within = sum(1 for e in errors["lookahead"] if abs(e) <= call) / max(1, len(errors["lookahead"]))
    return {"bpm": clock.bpm, "engine_call_ms_median": round(call * 1e3, 2),
            "with_lookahead": summary(errors["lookahead"]), "without_lookahead": summary(errors["none"]),
            "with_lookahead_within_one_call": round(within, 3),
            "errors_ms_with_lookahead": [round(e * 1e3, 1) for e in errors["lookahead"]]}


def storm(node: Node, rate: float, stop: threading.Event, sent: list[int], rate_only: bool = False) -> None:
    """`rate` updates a second: MIDI CCs through a mapper on the node's queue, Art-Net packets to
    its receiver, alternating."""
    path = Path("/tmp/streamnode-bench-midi.json")
    path.write_text('{"mappings": [{"kind": "cc", "channel": 1, "number": 1, "address": "/guidance"}]}')
    mapper = MidiMapper(node.queue, {"brush": 8, "lora": 8, "lfo": 8, "cues": 16}, path, live=node.live)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", node._surfaces.artnet.port)
    data = bytearray(16)
    i = 0
    t_next = time.monotonic()
    while not stop.is_set():
        i += 1
        if rate_only:
            pass  # the same wake-ups, nothing sent: separates the cost of updates from the ticking
        elif i % 2:
            mapper.handle(SimpleNamespace(type="control_change", channel=0, control=1, value=i % 128))
        else:
            data[0] = i % 256
            sock.sendto(artdmx(0, bytes(data)), target)
        sent[0] += 1
        t_next += 1.0 / rate
        delay = t_next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    sock.close()


def update_cost(node: Node, phase_s: float, phases: int, rate: float) -> dict[str, Any]:
    lfos = [Update("lfo", (0, {"target": "/similarity_max_skip", "shape": "sine", "beats": 1.0, "depth": 4.0,
                               "offset": 5.0}), origin="/lfo/0"),
            Update("lfo", (1, {"target": "/prompt_transition", "shape": "random", "beats": 0.5, "depth": 2.0,
                               "offset": 2.0}), origin="/lfo/1")]
    fps: dict[str, list[float]] = {"idle": [], "tick": [], "storm": []}
    rates: list[float] = []
    for p in range(3 * phases):
        mode = ("idle", "tick", "storm")[p % 3]
        stop = threading.Event()
        sent = [0]
        thread = None
        if mode != "idle":
            if mode == "storm":
                for u in lfos:
                    node.queue.put(u)
            thread = threading.Thread(target=storm, args=(node, rate, stop, sent, mode == "tick"))
            thread.start()
        else:
            for i in range(2):
                node.queue.put(Update("lfo", (i, "clear", None), origin="/lfo/clear"))
        time.sleep(0.5)  # settle
        n0, t0, s0 = node.frames_out, time.monotonic(), sent[0]
        time.sleep(phase_s)
        n1, t1, s1 = node.frames_out, time.monotonic(), sent[0]
        stop.set()
        if thread is not None:
            thread.join()
            if mode == "storm":
                rates.append((s1 - s0) / (t1 - t0))
        fps[mode].append((n1 - n0) / (t1 - t0))
    idle, tick, loaded = (statistics.median(fps[k]) for k in ("idle", "tick", "storm"))
    return {**{f"fps_{k}": [round(x, 2) for x in v] for k, v in fps.items()},
            "updates_per_s": round(statistics.median(rates), 1), "lfos": 2,
            "fps_ratio_storm_over_idle": round(loaded / idle, 4),
            "fps_ratio_storm_over_tick": round(loaded / tick, 4),
            "cost_percent_vs_tick": round(100 * (1 - loaded / tick), 2), "queue_replaced": node.queue.replaced}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beats", type=int, default=220, help="quantized changes (half with the lookahead)")
    ap.add_argument("--bpm", type=float, default=300.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--phase-s", type=float, default=4.0)
    ap.add_argument("--phases", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    base.register_sink("stamps", Stamps)
    clock = InternalClock(args.bpm, 4)
    node = Node(config(args.size), clock=clock)
    node.start()
    try:
        while node.frames_out < 10:
            time.sleep(0.05)
        result = {"benchmark": "tempo", "machine": platform.platform(), "model": "tiny", "size": args.size,
                  "beat_accuracy": beat_accuracy(node, clock, args.beats),
                  "update_cost": update_cost(node, args.phase_s, args.phases, args.rate)}
    finally:
        node.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
