"""A shape first seen during a show, on an OpenVINO engine whose process has converted nothing
(a node started from the engine cache, or switched to a model another process built): the
engine calls while the new UNet shape is compiled in the background, with the converted model
kept on disk as IR (accel/openvino_ir.py) and without it (the UNet traced again in-process).

Rounds alternate IR / no IR in one process, each with one more UNet row (steps) than the last,
so every round compiles a shape never seen. Per round: the longest and median engine call from
the steps change until the compile is done (those calls run in PyTorch, with more rows), the
same calls in PyTorch with nothing compiling, and the compile window.

    python benchmarks/openvino_new_shape.py --out benchmarks/results/openvino_new_shape.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import streamnode.accel.openvino as openvino_backend  # noqa: E402
from streamnode.accel import accelerate, restore  # noqa: E402
from streamnode.accel.cache import EngineCache  # noqa: E402
from streamnode.accel.openvino_ir import FOLDER as IR_FOLDER  # noqa: E402
from streamnode.diffusion.models import load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402
from streamnode.diffusion.tiny import ensure_tiny_model  # noqa: E402

START_ROWS = [32, 45]


def timed(engine: StreamEngine, frame: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        engine(frame)
        times.append(time.perf_counter() - start)
    return times


def one_round(engine: StreamEngine, cache: EngineCache, frame: np.ndarray, rows: list[int], keep_ir: bool) -> dict[str, Any]:
    if not keep_ir:
        shutil.rmtree(cache.root / IR_FOLDER, ignore_errors=True)
    openvino_backend._CONVERTED.clear()  # a fresh process: nothing converted in memory
    engine.update(t_index_list=START_ROWS)
    assert accelerate(engine, "openvino", threads=1, cache=cache) == "openvino"  # imported from the cache
    compiler = engine.unet_call.fast.compiler
    timed(engine, frame, 5)
    assert compiler.wait(300)
    before = timed(engine, frame, 20)
    engine.update(t_index_list=rows)
    start = time.perf_counter()
    during = timed(engine, frame, 1)  # asks for the compile; PyTorch serves it
    while not compiler.wait(0):
        during += timed(engine, frame, 1)
    window = time.perf_counter() - start
    restore(engine)
    alone = timed(engine, frame, 10)  # the same rows in PyTorch, nothing compiling
    return {
        "ir_kept": keep_ir, "unet_rows": len(rows), "compile_window_s": round(window, 2), "calls": len(during),
        "longest_call_ms": round(max(during) * 1e3, 1), "median_call_ms": round(statistics.median(during) * 1e3, 1),
        "pytorch_alone_longest_ms": round(max(alone) * 1e3, 1),
        "pytorch_alone_median_ms": round(statistics.median(alone) * 1e3, 1),
        "openvino_before_longest_ms": round(max(before) * 1e3, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6, help="alternating IR / no IR (up to 6)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    components = load_components(str(ensure_tiny_model()))
    engine = StreamEngine.from_components(components, t_index_list=START_ROWS, width=args.size, height=args.size,
                                          cfg_type="self", seed=3)
    engine.prepare(prompt="a harbour at dusk")
    frame = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    root = Path(tempfile.mkdtemp(prefix="sn-new-shape-"))
    try:
        cache = EngineCache(root)
        # The first start: converts, keeps the IR.
        assert accelerate(engine, "openvino", threads=1, cache=cache) == "openvino", "OpenVINO cannot run here"
        restore(engine)
        rows = [2, 4, 8, 16, 24, 32, 40, 45]  # round k runs the last k + 3 of these
        runs = [one_round(engine, cache, frame, rows[-(k + 3):], keep_ir=k % 2 == 0) for k in range(min(args.rounds, 6))]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def summary(ir: bool) -> dict[str, Any]:
        mine = [r for r in runs if r["ir_kept"] == ir]
        return {"rounds": len(mine), "longest_call_ms": [r["longest_call_ms"] for r in mine],
                "compile_window_s": [r["compile_window_s"] for r in mine]}

    result = {
        "benchmark": "openvino_new_shape", "size": args.size,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "ir_kept": summary(True), "traced_again": summary(False), "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
