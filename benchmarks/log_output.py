"""What a log call costs the thread that makes it, printed as JSON (and written to
benchmarks/results/log_output.json).

The same `logger.info(...)` call (a metrics-like line, ~130 bytes) behind four outputs:

- `direct`: `logging.StreamHandler` on a pipe a reader process drains (what `streamnode run`
  did before issue 21: the calling thread writes);
- `queued`: streamnode.logs' `LogOutput` (bounded queue, one writer thread) on such a pipe;
- `queued_stuck`: `LogOutput` on a pipe nobody reads;
- `direct_stuck`: `StreamHandler` on a pipe nobody reads: how many calls return before one
  blocks (more than 1 s); that one never returns.

The first three run interleaved, in rounds, each round on a fresh pipe; per-call µs as p50,
p99 and max over all rounds. Absolute times on a shared machine are noise: compare the
columns of one run. Run from the repository root:

    python benchmarks/log_output.py              # 5 rounds of 5000 calls
    python benchmarks/log_output.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.logs import CONSOLE_TIME, Console, LogOutput, LogRouter, TextFormatter  # noqa: E402

LINE = ("streaming | fps in %.1f out %.1f | engine %.1f ms | latency p50 %.1f ms p95 %.1f ms | "
        "dropped %d skipped %d")
ARGS = (29.9, 29.8, 31.2, 48.3, 61.0, 12, 3)
READER = "import os\nwhile os.read(0, 1 << 16):\n    pass\n"


def pipe_with_reader() -> tuple[int, subprocess.Popen[bytes]]:
    read, write = os.pipe()
    reader = subprocess.Popen([sys.executable, "-c", READER], stdin=read)
    os.close(read)
    return write, reader


def timed_calls(log: logging.Logger, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        log.info(LINE, *ARGS)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def make_logger(name: str, handler: logging.Handler) -> logging.Logger:
    log = logging.Logger(name, logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    return log


def run_direct(calls: int) -> list[float]:
    write, reader = pipe_with_reader()
    stream = open(write, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(CONSOLE_TIME))
    times = timed_calls(make_logger("direct", handler), calls)
    stream.close()
    reader.wait(10)
    return times


def run_queued(calls: int, stuck: bool) -> tuple[list[float], int]:
    if stuck:
        read, write = os.pipe()
        reader = None
    else:
        write, reader = pipe_with_reader()
    output = LogOutput("bench", Console(write), TextFormatter(CONSOLE_TIME))
    os.close(write)
    times = timed_calls(make_logger("queued", LogRouter([output])), calls)
    output.stop()
    if reader is not None:
        output.wait_idle(time.monotonic() + 30)
        output.close()
        reader.wait(10)
    else:
        os.close(read)  # the stuck writer gets EPIPE and ends
    return times, output.dropped


def run_direct_stuck(limit_s: float = 1.0) -> dict[str, Any]:
    read, write = os.pipe()
    stream = open(write, "w", encoding="utf-8")  # noqa: SIM115 - its writer is abandoned
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(CONSOLE_TIME))
    log = make_logger("direct_stuck", handler)
    calls = [0]

    def work() -> None:
        while True:
            log.info(LINE, *ARGS)
            calls[0] += 1

    logging.raiseExceptions = False  # the EPIPE when we close the read end below
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    last, since = -1, time.monotonic()
    while time.monotonic() - since < limit_s:
        time.sleep(0.05)
        if calls[0] != last:
            last, since = calls[0], time.monotonic()
    blocked = thread.is_alive()
    os.close(read)
    return {"calls_before_blocking": calls[0], "blocked_over_s": limit_s if blocked else None}


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {"p50_us": round(s[len(s) // 2], 2), "p99_us": round(s[int(len(s) * 0.99)], 2),
            "max_us": round(s[-1], 1), "calls": len(s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1000 calls")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "log_output.json"))
    args = parser.parse_args()
    rounds, calls = (2, 1000) if args.quick else (args.rounds, args.calls)

    direct: list[float] = []
    queued: list[float] = []
    stuck: list[float] = []
    dropped = 0
    for _ in range(rounds):
        direct += run_direct(calls)
        queued += run_queued(calls, stuck=False)[0]
        t, d = run_queued(calls, stuck=True)
        stuck += t
        dropped += d
    result = {
        "benchmark": "log_output",
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "rounds": rounds,
        "calls_per_round": calls,
        "line_bytes": len(TextFormatter(CONSOLE_TIME).format(logging.makeLogRecord(
            {"name": "streamnode.node.lifecycle", "levelname": "INFO", "levelno": 20, "msg": LINE, "args": ARGS}))),
        "direct": summary(direct),
        "queued": summary(queued),
        "queued_stuck": {**summary(stuck), "dropped": dropped},
        "direct_stuck": run_direct_stuck(),
    }
    result["queued_vs_direct_p50"] = round(result["queued"]["p50_us"] / result["direct"]["p50_us"], 2)
    result["queued_stuck_vs_direct_p50"] = round(result["queued_stuck"]["p50_us"] / result["direct"]["p50_us"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
