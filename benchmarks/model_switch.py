"""A model switch under load: the longest gap in the output, measured where a consumer sees it.

The node runs for real on the tiny model (the demo's 256², one step): test pattern in,
`shm://` out, OSC on. A reader in another process (streamnode's own ShmSource, as TouchDesigner
or OBS would read the segment) stamps every new frame. After a few seconds of streaming a
`/model` message asks for the tiny model again from its folder (a real load from disk: weights,
text encoding of the live prompts, the warm-up call), and the script reports:

- the slowest engine call in the seconds before the switch (the engine's own calls, timed);
- the longest gap between two frames the reader got, from the /model message until 2 s after
  the swap, and the same over the seconds before the switch for comparison;
- how long the load took, and how many frames came out while it ran.

The goal (issue "One live-parameter schema…"): no gap during a switch longer than the slowest
engine call before it. Both are maxima over a few seconds of a scattering machine, so with
--control each switch run is followed by a run with no switch, measured the same way over as
long a window: how often the machine alone breaks the bound. The garbage collector's passes
during the switch are counted (a full pass stops every thread). Prints JSON; --out writes it too.

    python benchmarks/model_switch.py --runs 8 --control --out benchmarks/results/model_switch.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pythonosc.udp_client import SimpleUDPClient  # noqa: E402

from streamnode.accel.cache import EngineCache  # noqa: E402
from streamnode.accel.openvino_ir import FOLDER as IR_FOLDER  # noqa: E402
from streamnode.config import NodeConfig, load_config  # noqa: E402
from streamnode.diffusion.tiny import ensure_tiny_model  # noqa: E402
from streamnode.engine import Engine  # noqa: E402
from streamnode.node import Node, build_engine  # noqa: E402

READER = textwrap.dedent("""
    import sys, time
    from streamnode.io.shm import ShmSource
    src = ShmSource(sys.argv[1])
    deadline = time.monotonic() + float(sys.argv[2])
    while True:
        try:
            src.open()
            break
        except Exception:
            time.sleep(0.05)
    while time.monotonic() < deadline:
        if src.read(0.05) is not None:
            print(time.monotonic(), flush=True)
    src.close()
""")


class TimedEngines:
    """The node's own engine builder, timing every call of every engine it builds."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []  # the engine thread's: (end time, seconds)
        self.warm_calls: list[tuple[float, float]] = []  # the loader's warm-up calls
        self.builds: list[tuple[float, float]] = []  # (start, end) of each engine build
        self.engines: list[Engine] = []

    def __call__(self, config: NodeConfig) -> Engine:
        t_build = time.monotonic()
        engine = build_engine(config)
        self.builds.append((t_build, time.monotonic()))
        call = engine.__class__.__call__

        def timed(image: Any) -> Any:
            t0 = time.monotonic()
            out = call(engine, image)
            calls = self.calls if threading.current_thread().name == "engine" else self.warm_calls
            calls.append((time.monotonic(), time.monotonic() - t0))
            return out

        self.engines.append(engine)
        return _Timed(engine, timed)


class _Timed:
    """The engine, called through the timing wrapper (the node calls `engine(image)`)."""

    def __init__(self, engine: Engine, timed: Any) -> None:
        self._engine, self._timed = engine, timed

    def __call__(self, image: Any) -> Any:
        return self._timed(image)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class GcLog:
    """Every garbage collection: (when it ended, generation, seconds), from gc.callbacks."""

    def __init__(self) -> None:
        self.done: list[tuple[float, int, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.monotonic()
        else:
            self.done.append((time.monotonic(), info["generation"], time.monotonic() - self._t0))

    def close(self) -> None:
        gc.callbacks.remove(self._on)


def forget(folder: str) -> None:
    """Remove a copied model, and the engines and converted models kept for it, from the user's cache."""
    root = EngineCache().root
    for sidecar in [*root.glob("*/engine.json"), *root.glob(f"{IR_FOLDER}/*/ir.json")]:
        if json.loads(sidecar.read_text()).get("key", {}).get("model", "").startswith(f"{folder}@"):
            shutil.rmtree(sidecar.parent, ignore_errors=True)
    shutil.rmtree(Path(folder).parent, ignore_errors=True)


def measure(size: int, before_s: float, after_s: float, accel: str = "eager",
            control_load_s: float | None = None, uncached: bool = False) -> dict[str, Any]:
    """One run. With `control_load_s`, a control run: no /model is sent, and the same figures
    are taken over a window as long as a switch's (that load time, then `after_s`), so the
    machine's own scatter of the longest gap against the slowest call before shows beside the
    switch's."""
    folder = str(ensure_tiny_model())
    if uncached:  # the same weights under a path never seen: no engine of it is in the cache
        copy = Path(tempfile.mkdtemp(prefix="sn-switch-")) / "tiny"
        shutil.copytree(folder, copy)
        folder = str(copy)
    segment = f"sn_switch{uuid.uuid4().hex[:6]}"
    cfg = load_config(preset="demo", overrides={
        "sinks": [f"shm://{segment}"], "stream.width": size, "stream.height": size, "runtime.duration": None,
        "osc.enabled": True, "osc.port": 0, "osc.allow_model_switch": True, "model.accel": accel,
    })
    timed = TimedEngines()
    collections = GcLog()
    node = Node(cfg, engine_factory=timed, freeze_heap=True)  # as `streamnode run` makes it
    node.start()
    reader = None
    try:
        deadline = time.monotonic() + 120
        while node.status()["state"] != "streaming":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not stream: {node.status()['error']}")
            time.sleep(0.05)
        reader = subprocess.Popen([sys.executable, "-c", READER, segment, str(before_s + after_s + 60)],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(before_s)
        t_request = time.monotonic()
        if control_load_s is None:
            SimpleUDPClient("127.0.0.1", node.osc_port).send_message("/model", folder)
            while node.config.model.id != folder:
                if time.monotonic() > t_request + 120:
                    raise RuntimeError(f"the switch did not happen: {node.status()['error']}")
                time.sleep(0.005)
        else:
            time.sleep(control_load_s)
        t_swap = time.monotonic()
        time.sleep(after_s)
    finally:
        collections.close()
        node.stop()
        if reader is not None:
            reader.terminate()
    stamps = [float(line) for line in reader.stdout.read().split()] if reader is not None else []  # type: ignore[union-attr]
    if uncached:
        forget(folder)

    def widest(t0: float, t1: float) -> tuple[float, float]:
        """The longest gap between two frames read in [t0, t1], and when it began."""
        inside = [t for t in stamps if t0 <= t <= t1]
        return max(((b - a, a) for a, b in zip(inside, inside[1:], strict=False)), default=(float("nan"), t0))

    calls_before = [s for end, s in timed.calls if t_request - before_s <= end <= t_request]
    switch_gap, gap_start = widest(t_request, t_swap + 2.0)
    in_switch = [(t, g, d) for t, g, d in collections.done if t_request <= t <= t_swap + 2.0]
    in_gap = [d for t, _g, d in collections.done if gap_start <= t <= gap_start + switch_gap]
    calls_during = [s for end, s in timed.calls if t_request <= end <= t_swap + 2.0]
    slowest = max(calls_before)
    warm_end, warm_s = timed.warm_calls[-1] if timed.warm_calls else (0.0, 0.0)  # the new engine's warm-up call
    if control_load_s is not None:
        return {"kind": "control (no switch)", "window_s": round(t_swap + 2.0 - t_request, 3),
                "slowest_engine_call_before_ms": round(slowest * 1e3, 1),
                "longest_gap_in_window_ms": round(switch_gap * 1e3, 1),
                "gap_over_slowest_call": round(switch_gap / slowest, 2), "ok": switch_gap <= slowest}
    return {
        "kind": "switch",
        "size": size,
        "frames_read": len(stamps),
        "load_s": round(t_swap - t_request, 3),
        "frames_during_load": len([t for t in stamps if t_request <= t <= t_swap]),
        "slowest_engine_call_before_ms": round(slowest * 1e3, 1),
        "median_engine_call_before_ms": round(sorted(calls_before)[len(calls_before) // 2] * 1e3, 1),
        "longest_gap_before_ms": round(widest(t_request - before_s + 1.0, t_request)[0] * 1e3, 1),
        "longest_gap_during_switch_ms": round(switch_gap * 1e3, 1),
        "gap_over_slowest_call": round(switch_gap / slowest, 2),
        "gap_began_after_request_s": round(gap_start - t_request, 3),
        "slowest_engine_call_during_switch_ms": round(max(calls_during, default=float("nan")) * 1e3, 1),
        # The load's phases, from the request: the engine built (files, modules, weights), then
        # the live state replayed and one warm-up call on the loader's thread.
        "built_after_request_s": round(timed.builds[-1][1] - t_request, 3),
        "warm_call": [round(warm_end - warm_s - t_request, 3), round(warm_s * 1e3, 1)] if timed.warm_calls else [],
        # The interpreter's garbage collector stops every thread while it runs: a full pass over
        # the start-up heap takes a few hundred ms here, so it is counted.
        "gc_passes_during_switch": {str(g): sum(1 for _t, gen, _d in in_switch if gen == g) for g in (0, 1, 2)},
        "gc_longest_during_switch_ms": round(max((d for _t, _g, d in in_switch), default=0.0) * 1e3, 1),
        "gc_ms_inside_the_longest_gap": round(sum(in_gap) * 1e3, 1),
        "ok": switch_gap <= slowest,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--before", type=float, default=6.0, help="seconds of streaming before the switch")
    parser.add_argument("--after", type=float, default=3.0, help="seconds after the swap")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="eager", help="model.accel of the node (default eager; auto: OpenVINO on a CPU)")
    parser.add_argument("--control", action="store_true",
                        help="after each switch, a run without one over as long a window: the machine's own scatter")
    parser.add_argument("--uncached", action="store_true",
                        help="switch to a copy of the model at a new path: its accelerated models are built during the switch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs, controls = [], []
    for _ in range(args.runs):
        runs.append(measure(args.size, args.before, args.after, args.accel, uncached=args.uncached))
        if args.control:
            controls.append(measure(args.size, args.before, args.after, args.accel, runs[-1]["load_s"]))

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        ratios = sorted(r["gap_over_slowest_call"] for r in rs)
        return {"runs": len(rs), "within_the_slowest_call_before": sum(r["ok"] for r in rs),
                "gap_over_slowest_call_median": ratios[len(ratios) // 2], "max": ratios[-1]}

    result: dict[str, Any] = {
        "benchmark": "model_switch",
        "accel": args.accel,
        "uncached": args.uncached,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "switches": summary(runs),
    }
    if controls:
        result["controls"] = summary(controls)
    result["runs"] = runs + controls
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
