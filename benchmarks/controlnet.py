"""ControlNets: what a frame costs with 0, 1, 2 and 4 nets against the plain engine, what reusing
residuals for N frames saves, and what each built-in map preprocessor costs, printed as JSON.

Engines on the same components, size and schedule, timed interleaved frame by frame (each figure
is the median (and the mean) over frames, so a neighbour's CPU burst hits all alike):

  - `plain`: no ControlNet,
  - `nets x0`: four nets added at scale 0 (the "no cost" claim: none is evaluated),
  - `nets x1`, `x2`, `x4`: 1, 2, 4 nets at scale 1 (edges-soft maps made on the engine thread,
    as the library does without the node),
  - `x1 reuse 2`, `x1 reuse 4`: one net whose residuals are computed every 2 / 4 frames.

The nets are random ControlNets made from the model's UNet (tiny_controlnet.random_controlnet).
A frame changes every call (a moving gradient), so nothing is skipped.

    python benchmarks/controlnet.py                     # tiny, CPU, 128², T = 2, cfg self, 1 thread
    python benchmarks/controlnet.py --out benchmarks/results/controlnet.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.control_maps import BUILTIN_MAPS, make_map  # noqa: E402
from streamnode.diffusion.models import load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402
from streamnode.diffusion.tiny_controlnet import random_controlnet  # noqa: E402


def engine_with(c: Any, args: argparse.Namespace, nets: list[str], scale: float, reuse: int = 1) -> StreamEngine:
    engine = StreamEngine.from_components(c, t_index_list=[20, 45], width=args.size, height=args.size,
                                          cfg_type="self", similarity_threshold=0.0)
    engine.prepare(prompt="a watercolour city at dusk")
    for i, folder in enumerate(nets):
        engine.update(controlnet=(i, {"model": folder, "map": "edges-soft", "scale": scale, "reuse": reuse}))
    return engine


def frames(size: int, n: int) -> list[np.ndarray]:
    x = np.linspace(0, 255, size, dtype=np.float32)
    return [np.stack([np.roll(x, 7 * k)[None, :].repeat(size, 0), x[:, None].repeat(size, 1),
                      np.full((size, size), 40.0 * (k % 5))], axis=2).astype(np.uint8) for k in range(n)]


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = load_components(args.model, device="cpu", dtype="float32", cpu_threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for seed in range(4):
            folder = Path(tmp) / f"net{seed}"
            random_controlnet(c.unet, seed).save_pretrained(folder, safe_serialization=True)
            folders.append(str(folder))
        engines = {
            "plain": engine_with(c, args, [], 1.0),
            "nets x0": engine_with(c, args, folders, 0.0),
            "nets x1": engine_with(c, args, folders[:1], 1.0),
            "nets x2": engine_with(c, args, folders[:2], 1.0),
            "nets x4": engine_with(c, args, folders, 1.0),
            "x1 reuse 2": engine_with(c, args, folders[:1], 1.0, reuse=2),
            "x1 reuse 4": engine_with(c, args, folders[:1], 1.0, reuse=4),
        }
    inputs = frames(args.size, args.frames)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(inputs[-1])  # warm: the stream fill, lazy kernels
    for frame in inputs:
        for name, engine in engines.items():
            times[name].append(timed(lambda e=engine, f=frame: e(f)))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    means = {name: statistics.fmean(t) * 1e3 for name, t in times.items()}

    # The preprocessors alone, on the frame the engine gets ((1, 3, H, W) in [-1, 1]).
    image = torch.from_numpy(inputs[0]).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    maps: dict[str, list[float]] = {name: [] for name in BUILTIN_MAPS}
    with torch.inference_mode():
        for _ in range(args.frames):
            for name in BUILTIN_MAPS:
                maps[name].append(timed(lambda n=name: make_map(n, image)))
    result = {
        "benchmark": "controlnet",
        "model": args.model,
        "size": args.size,
        "t_index_list": [20, 45],
        "cfg_type": "self",
        "threads": args.threads,
        "frames": args.frames,
        "machine": f"{platform.machine()} {platform.processor()} ({args.threads} torch threads)",
        "ms_per_frame_median": {k: round(v, 2) for k, v in medians.items()},
        "ratio_to_plain": {k: round(v / medians["plain"], 3) for k, v in medians.items()},
        # Reuse alternates full and cheap frames: its mean, not its median, is the cost per frame.
        "ms_per_frame_mean": {k: round(v, 2) for k, v in means.items()},
        "mean_ratio_to_plain": {k: round(v / means["plain"], 3) for k, v in means.items()},
        "net_calls_per_frame": {
            k: round(e.controlnets.stats["controlnet_calls"] / max(1, e.stats["unet_calls"]), 3)
            for k, e in engines.items()
        },
        "preprocessor_ms_median": {k: round(statistics.median(v) * 1e3, 3) for k, v in maps.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
