"""Regional prompts (semantic brushes): frames/s with 0, 1, 2, 4 brushes, printed as JSON.

Engines, all on the same components, size, schedule and cfg_type, timed interleaved frame by
frame (each figure is the median over frames, so a neighbour's CPU burst hits all alike):

  - `plain`: a StreamEngine that never had a brush,
  - `0 brushes`: one that had brushes, edited and then removed or disabled (the "empty brush
    list" must cost what the plain engine costs),
  - `1`, `2`, `4 brushes`: that many active brushes over different regions.

For each: UNet rows per call, frames/s, ms per frame, the UNet's share, and the ratios to the
plain engine (time vs rows): the target is that cost grows no faster than the UNet row count.
Also the cost of live edits (a cached prompt, a new rectangle, a new blur) at this size.

    python benchmarks/regions.py                    # tiny, CPU, 256², T = 2, cfg self, 1 thread
    python benchmarks/regions.py --out benchmarks/results/regions.json

The tiny model's images are noise-like: this measures cost, not looks. On a CPU the tiny VAE
is a large fixed share of a 256² frame, so frames/s falls more slowly than the rows grow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.models import ModelComponents, load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

PROMPT = "a watercolour city at dusk"
BRUSHES: list[dict[str, Any]] = [
    {"prompt": "roaring flames", "rect": (0.0, 0.0, 0.5, 0.5), "mask_blur": 12.0},
    {"prompt": "a stormy ocean", "rect": (0.0, 0.6, 1.0, 0.4)},
    {"prompt": "a blazing sun", "circle": (0.75, 0.25, 0.15)},
    {"prompt": "a neon sign", "rect": (0.55, 0.3, 0.4, 0.2), "prompt_strength": 0.8},
]
EMPTY_TOLERANCE = 0.05  # timing noise allowed on a shared CPU: "the same" / "no faster" within 5 %


class UnetTimer:
    """Seconds spent inside one engine's UNet seam, and the rows it was called with."""

    def __init__(self, engine: StreamEngine) -> None:
        self.seconds = 0.0
        self.rows: list[int] = []
        self._cuda = engine.device.type == "cuda"
        unet = engine.unet_call

        def timed(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            self._sync()
            t0 = time.perf_counter()
            out = unet(x, t, emb)
            self._sync()
            self.seconds += time.perf_counter() - t0
            self.rows.append(int(x.shape[0]))
            return out

        engine.unet_call = timed

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def make_engine(c: ModelComponents, args: argparse.Namespace) -> StreamEngine:
    engine = StreamEngine.from_components(
        c, t_index_list=args.t_index, width=args.size, height=args.size, cfg_type=args.cfg,
        similarity_threshold=0.0,
    )
    engine.prepare(prompt=PROMPT, guidance_scale=1.2)
    return engine


def emptied_engine(c: ModelComponents, args: argparse.Namespace) -> StreamEngine:
    """An engine whose brushes were added, edited and then removed, disabled or emptied."""
    engine = make_engine(c, args)
    for i, brush in enumerate(BRUSHES):
        engine.set_brush(i, **brush)
    engine.update(brush=(0, "prompt", "lava"))
    engine.clear_brush(1)
    engine.clear_brush(3)
    engine.update(brush=(0, "enabled", False))
    engine.update(brush=(2, "mask_strength", 0.0))
    assert engine.regions.active == () and engine.layers == 1
    return engine


def timed_call(run: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def edit_costs(c: ModelComponents, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of live edits between frames (one brush among four)."""
    engine = make_engine(c, args)
    for i, brush in enumerate(BRUSHES):
        engine.set_brush(i, **brush)
    engine.update(brush=(1, "prompt", "lava"))  # both prompts now cached
    edits: dict[str, list[Callable[[], None]]] = {
        "prompt_cached": [lambda p=p: engine.update(brush=(1, "prompt", p)) for p in ("a stormy ocean", "lava")],
        "rect": [lambda r=r: engine.update(brush=(1, "rect", r)) for r in ((0, 0.6, 1, 0.4), (0, 0.5, 1, 0.5))],
        "blur": [lambda b=b: engine.update(brush=(0, "mask_blur", b)) for b in (8.0, 16.0)],
        "enable_toggle": [lambda e=e: engine.update(brush=(2, "enabled", e)) for e in (False, True)],
    }
    out = {}
    for name, calls in edits.items():
        times = [timed_call(call, False) for _ in range(5) for call in calls]
        out[name] = round(1e3 * statistics.median(times), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t-index", type=int, nargs="+", default=[32, 45])
    parser.add_argument("--cfg", default="self", choices=["none", "full", "self", "initialize"])
    parser.add_argument("--frames", type=int, default=10, help="frames per timed round and engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared CPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    c = load_components(args.model, device=args.device, dtype=args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)  # after loading: the loader sets its own CPU budget
    cuda = c.device.type == "cuda"

    engines: dict[str, StreamEngine] = {"plain": make_engine(c, args), "0 brushes": emptied_engine(c, args)}
    for n in (1, 2, 4):
        engine = make_engine(c, args)
        for i, brush in enumerate(BRUSHES[:n]):
            engine.set_brush(i, **brush)
        assert len(engine.regions.active) == n
        engines[f"{n} brushes"] = engine
    timers = {name: UnetTimer(engine) for name, engine in engines.items()}

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.frames)]
    with torch.inference_mode():
        for frame in frames[: args.warmup]:
            for engine in engines.values():
                engine(frame)
        per_frame: dict[str, list[float]] = {name: [] for name in engines}
        unet: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for frame in frames:
                for name, engine in engines.items():
                    timers[name].seconds = 0.0
                    per_frame[name].append(timed_call(lambda e=engine, f=frame: e(f), cuda))
                    unet[name].append(timers[name].seconds)

    plain_s = statistics.median(per_frame["plain"])
    plain_unet = statistics.median(unet["plain"])
    plain_rows = engines["plain"].batch_rows
    runs = []
    for name, engine in engines.items():
        seconds, unet_s = statistics.median(per_frame[name]), statistics.median(unet[name])
        rows = timers[name].rows[-1]
        assert rows == engine.batch_rows
        runs.append({
            "engine": name,
            "active_brushes": len(engine.regions.active),
            "unet_rows_per_call": rows,
            "fps": round(1.0 / seconds, 3),
            "ms_per_frame": round(1e3 * seconds, 2),
            "unet_ms_per_frame": round(1e3 * unet_s, 2),
            "rest_ms_per_frame": round(1e3 * (seconds - unet_s), 2),
            "rows_vs_plain": round(rows / plain_rows, 3),
            "time_vs_plain": round(seconds / plain_s, 3),
            "unet_time_vs_plain": round(unet_s / plain_unet, 3),
        })
    by_name = {r["engine"]: r for r in runs}
    result: dict[str, Any] = {
        "benchmark": "regions",
        "model": args.model,
        "device": str(c.device),
        "dtype": str(c.dtype).removeprefix("torch."),
        "size": args.size,
        "t_index_list": args.t_index,
        "cfg_type": args.cfg,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "frames_per_engine_and_round": args.frames,
        "rounds": args.rounds,
        "runs": runs,
        "edit_ms": edit_costs(c, args),
        "targets_met": {
            "empty_brush_list_costs_the_plain_engine": abs(by_name["0 brushes"]["time_vs_plain"] - 1.0)
            <= EMPTY_TOLERANCE,
            "cost_grows_no_faster_than_unet_rows": all(
                r["time_vs_plain"] <= r["rows_vs_plain"] * (1 + EMPTY_TOLERANCE) for r in runs
            ),
            "unet_cost_grows_no_faster_than_unet_rows": all(
                r["unet_time_vs_plain"] <= r["rows_vs_plain"] * (1 + EMPTY_TOLERANCE) for r in runs
            ),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
