"""The LoRA stack: what a frame costs with LoRAs in runtime and in merged mode, and what a weight
change costs, printed as JSON.

Engines on private copies of the same components, same size and schedule, timed interleaved
frame by frame (each figure is the median over frames, so a neighbour's CPU burst hits all alike):

  - `base`: no LoRA,
  - `runtime x1`, `runtime x3`: one and three LoRAs as runtime adapters,
  - `merged x3`: the same three LoRAs merged into the weights (the target: the cost of `base`).

LoRAs are random rank-`--rank` factors on every attention projection and every ResNet
convolution (the layers style LoRAs train), fed through the stack's own install path.
A weight change: on the engine thread (runtime: the scale copy; merged: the in-place copy of the
merged weights) and off it (merged: the re-merge, `prepare_lora`).

    python benchmarks/lora.py                    # tiny, CPU, 128², T = 1, cfg none, 1 thread
    python benchmarks/lora.py --model tiny-sdxl --out benchmarks/results/lora.json

The tiny models are narrow (32/64 channels): a rank-4 LoRA is a larger share of a layer than a
rank-32 LoRA is of SDXL's 640/1280-wide ones, so the runtime overhead here is an upper bound.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.lora import Factors, LoraWeights  # noqa: E402
from streamnode.diffusion.models import load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def random_lora(unet: Any, rank: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, m in unet.named_modules():
        if not name.endswith(TARGETS):
            continue
        if isinstance(m, torch.nn.Linear):
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        elif isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        else:
            continue
        factors[name] = Factors(down * 0.01, up * 0.01)
    return LoraWeights(f"random-{seed}", factors)


def engine_with(c: Any, args: argparse.Namespace, mode: str, loras: int) -> StreamEngine:
    private = dataclasses.replace(c, unet=copy.deepcopy(c.unet))
    engine = StreamEngine.from_components(private, t_index_list=[35], width=args.size, height=args.size,
                                          cfg_type="none", similarity_threshold=0.0, lora_mode=mode)
    engine.prepare(prompt="a watercolour city at dusk")
    for i in range(loras):
        plan = engine.loras.plan(i, {"source": f"random-{i}", "weight": 0.8}, loaded=random_lora(private.unet, args.rank, i))
        engine.update(lora=plan)
    return engine


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = load_components(args.model, device="cpu", dtype="float32", cpu_threads=args.threads)
    engines = {
        "base": engine_with(c, args, "runtime", 0),
        "runtime x1": engine_with(c, args, "runtime", 1),
        "runtime x3": engine_with(c, args, "runtime", 3),
        "merged x3": engine_with(c, args, "merged", 3),
    }
    frame = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(frame)  # warm: the stream fill, lazy kernels
    for _ in range(args.frames):
        for name, engine in engines.items():
            times[name].append(timed(lambda e=engine: e(frame)))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    # A weight change, 20 times each: on the engine thread (commit) and off it (merged: the plan).
    runtime, merged = engines["runtime x3"], engines["merged x3"]
    runtime_commit, merged_plan, merged_commit = [], [], []
    for k in range(20):
        w = 0.1 + 0.04 * k
        plan = runtime.prepare_lora((0, "weight", w))
        runtime_commit.append(timed(lambda p=plan: runtime.update(lora=p)))
        t0 = time.perf_counter()
        plan = merged.prepare_lora((0, "weight", w))
        merged_plan.append(time.perf_counter() - t0)
        merged_commit.append(timed(lambda p=plan: merged.update(lora=p)))
    layers = len(next(iter(engines["runtime x1"].loras._slots.values())).weights.factors)
    result = {
        "benchmark": "lora",
        "model": args.model,
        "size": args.size,
        "rank": args.rank,
        "layers_per_lora": layers,
        "threads": args.threads,
        "frames": args.frames,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch threads)".strip(),
        "ms_per_frame_median": {k: round(v, 2) for k, v in medians.items()},
        "ratio_to_base": {k: round(v / medians["base"], 3) for k, v in medians.items()},
        "weight_change_ms_median": {
            "runtime: on the engine thread": round(statistics.median(runtime_commit) * 1e3, 3),
            "merged: re-merge, off the engine thread": round(statistics.median(merged_plan) * 1e3, 3),
            "merged: in-place copy, on the engine thread": round(statistics.median(merged_commit) * 1e3, 3),
        },
    }
    for engine in engines.values():
        engine.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
