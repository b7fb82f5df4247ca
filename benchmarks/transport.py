"""Transport speed: frames/s and added latency through the ring buffer and each host transport.

The node runs for real (capture thread → ring buffer → engine thread → mailbox → sink thread)
with the pass-through engine, so what is measured is the node's plumbing, not a model:

1. Throughput: `--no-drop` with an unpaced test://noise source, N frames at 512²: every stage
   runs as fast as the slowest one allows, nothing is dropped. frames/s over the last N−W
   frames (W warm-up frames left out).
2. Added latency: live mode, a 60 fps source, a few seconds: capture → the sink's send()
   returning, p50/p95 (the node's own metric). For shm:// also capture → a reader in another
   process holding a copy (the documented reader, polling), which is what a consumer sees.

Targets (issue 4): ≥ 500 frames/s through ring buffer + shm, ≤ 2 ms added latency.

    python benchmarks/transport.py                   # all host transports, 512²
    python benchmarks/transport.py --only null,shm --frames 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamnode.config import load_config  # noqa: E402
from streamnode.node import Node  # noqa: E402

TRANSPORTS = ("null", "shm", "file", "http", "vcam")


def sink_uri(kind: str, tmp: Path) -> str:
    return {
        "null": "null://",
        "shm": f"shm://sn_bench{uuid.uuid4().hex[:6]}",
        "file": f"file://{tmp / 'bench.avi'}",  # MJPG: the cheapest encoder OpenCV always has
        "http": "http://127.0.0.1:0?fps=1000",  # a viewer attached, every frame encoded
        "vcam": "vcam://?backend=streamnode-bench&fps=60",
    }[kind]


def register_fake_vcam() -> None:
    """pyvirtualcam backend that accepts frames and drops them (no v4l2loopback here)."""
    import pyvirtualcam

    class Discard:
        def __init__(self, **_: Any) -> None:
            pass

        def send(self, frame: np.ndarray) -> None:
            pass

        def close(self) -> None:
            pass

        def device(self) -> str:
            return "bench"

        def native_fourcc(self) -> None:
            return None

    pyvirtualcam.register_backend("streamnode-bench", Discard)


def make_node(uri: str, size: int, *, no_drop: bool, fps: float, frames: int | None, duration: float | None) -> Node:
    overrides: dict[str, Any] = {
        "source.uri": f"test://noise?fps={fps}", "sinks": [uri], "stream.width": size, "stream.height": size,
        "runtime.engine": "passthrough", "runtime.no_drop": no_drop, "osc.enabled": False,
        "runtime.metrics_interval_s": 3600.0,
    }
    if frames:
        overrides["runtime.max_frames"] = frames
    if duration:
        overrides["runtime.duration"] = duration
    return Node(load_config(overrides=overrides))


def watch_http(node: Node, stop: threading.Event) -> None:
    """A viewer on the preview's MJPEG stream, so that it encodes."""
    import urllib.request

    preview = node.sinks[0]
    with urllib.request.urlopen(preview.url + "stream.mjpg", timeout=5) as r:  # noqa: S310 - loopback
        while not stop.is_set() and r.read1(1 << 16):
            pass


def throughput(kind: str, size: int, frames: int, warmup: int, tmp: Path) -> dict[str, Any]:
    node = make_node(sink_uri(kind, tmp), size, no_drop=True, fps=1000.0, frames=frames, duration=None)
    marks: list[tuple[int, float]] = []  # (frames out, time) when the warm-up ends and at the end
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            n = node.frames_out
            if (not marks and n >= warmup) or (len(marks) == 1 and n >= frames):
                marks.append((n, time.perf_counter()))
            if len(marks) == 2:
                return

    node.start()
    if kind == "http":
        threading.Thread(target=watch_http, args=(node, stop), daemon=True).start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = node.run()
    stop.set()
    sampler.join(1)
    if code != 0 or len(marks) < 2:
        return {"error": node.status()["error"] or "did not finish"}
    (n0, t0), (n1, t1) = marks
    fps = (n1 - n0) / (t1 - t0)
    return {"fps": round(fps, 1), "frames": frames, "ms_per_frame": round(1000 / fps, 3)}


READER = textwrap.dedent("""
    import sys, time, json
    {reader}
    name, seconds = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + 10
    while True:
        try:
            shm = open_frames(name)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    lat, last, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        got = read_frame(shm, last)
        if got is None:
            time.sleep(0.0002)
            continue
        last, t, _ = got
        lat.append((time.monotonic_ns() - t) / 1e6)
    shm.close()
    print(json.dumps(lat))
""")


def doc_reader() -> str:
    section = (ROOT / "docs" / "shm-format.md").read_text(encoding="utf-8").split("## Reading it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def latency(kind: str, size: int, seconds: float, tmp: Path) -> dict[str, Any]:
    uri = sink_uri(kind, tmp)
    node = make_node(uri, size, no_drop=False, fps=60.0, frames=None, duration=seconds)
    reader = None
    if kind == "shm":
        code = READER.format(reader=doc_reader())
        reader = subprocess.Popen([sys.executable, "-c", code, uri.removeprefix("shm://"), str(seconds - 0.5)],
                                  stdout=subprocess.PIPE, text=True)
    stop = threading.Event()
    node.start()
    if kind == "http":
        threading.Thread(target=watch_http, args=(node, stop), daemon=True).start()
    node.run()
    stop.set()
    status = node.status()
    out: dict[str, Any] = {
        "sink_p50_ms": status["latency_ms_p50"], "sink_p95_ms": status["latency_ms_p95"],
        "fps_out": round(node.frames_out / seconds, 1), "dropped": status["dropped"],
    }
    if reader is not None:
        samples = json.loads(reader.communicate(timeout=30)[0] or "[]")
        if samples:
            samples.sort()
            out["reader_p50_ms"] = round(statistics.median(samples), 3)
            out["reader_p95_ms"] = round(samples[int(0.95 * (len(samples) - 1))], 3)
            out["reader_frames"] = len(samples)
    return out


def ring_only(size: int, frames: int) -> dict[str, Any]:
    """The ring buffer alone: one producer thread, one consumer thread, ordered mode, 512² frames."""
    from streamnode.frames import RingBuffer

    ring = RingBuffer((size, size, 3), 4, block=True)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)

    def produce() -> None:
        for seq in range(frames):
            ring.put(image, seq, time.monotonic_ns(), timeout=5)
        ring.close()

    lat = []
    thread = threading.Thread(target=produce)
    t0 = time.perf_counter()
    thread.start()
    while (frame := ring.get_next(5)) is not None:
        lat.append(time.monotonic_ns() - frame.t_capture)
    elapsed = time.perf_counter() - t0
    thread.join()
    lat.sort()
    return {"fps": round(frames / elapsed, 1), "handoff_p50_ms": round(lat[len(lat) // 2] / 1e6, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=2000, help="frames per throughput run")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each latency run")
    parser.add_argument("--only", default=",".join(TRANSPORTS), help=f"comma-separated subset of {TRANSPORTS}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transport.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    if "vcam" in kinds:
        register_fake_vcam()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"streamnode-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "transport",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "size": args.size, "engine": "passthrough",
        "ring_buffer_alone": ring_only(args.size, args.frames),
        "transports": {},
    }
    for kind in kinds:
        frames = args.frames if kind in ("null", "shm") else max(300, args.frames // 5)
        results["transports"][kind] = {
            "throughput_no_drop": throughput(kind, args.size, frames, warmup=min(100, frames // 5), tmp=tmp),
            "latency_live_60fps": latency(kind, args.size, args.seconds, tmp),
        }
        print(kind, json.dumps(results["transports"][kind]), file=sys.stderr)
    shm = results["transports"].get("shm", {})
    if shm:
        fps = shm["throughput_no_drop"].get("fps", 0)
        lat = shm["latency_live_60fps"].get("reader_p50_ms") or shm["latency_live_60fps"].get("sink_p50_ms")
        results["targets"] = {"shm_fps_ge_500": fps >= 500, "shm_added_latency_le_2ms": lat is not None and lat <= 2}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
