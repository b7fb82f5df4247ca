"""Temporal consistency: flicker, responsiveness, smear and cost of each option, printed as JSON.

Inputs (uint8 RGB at --size):
  - `still`: a fixed test pattern plus per-frame sensor-like noise (Gaussian, σ = --noise levels):
    nothing in the scene changes, so every change of the output is flicker;
  - `step`: the same, with a real change at frame --change (a bright square appears and stays);
  - `moving`: a bar sliding across the pattern, one step per frame.

Per option (an engine with that option, all on the same components, size and schedule):
  - flicker: mean |out_t − out_{t−1}| (uint8 levels) on `still`, after the warm-up frames;
  - responsiveness: frames from the input change in `step` until the output is within 10 % of
    the change of where it settles (counted from the frame the change enters; the stream's own
    delay of T − 1 frames included);
  - smear: mean |out − plain out| on `moving` (what the option costs a moving scene);
  - ms per frame: median over the frames after each input's warm-up, engines timed interleaved
    frame by frame (a neighbour's CPU burst hits all alike), and the ratio to `plain`.

    python benchmarks/temporal.py                          # tiny, CPU, 256², T = 2, 1 thread
    python benchmarks/temporal.py --model PATH --out benchmarks/results/temporal.json
    python benchmarks/temporal.py --model sd-turbo-arch --options plain bank smoothing_0.5_motion --frames 8
                                      # cost at sd-turbo's size (random weights: cost only)

Flicker is only meaningful on a model whose output follows its input: on the random tiny
model the output barely depends on the input (or on the attention), so there the figures
measure cost, not looks.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.models import ModelComponents, load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

PROMPT = "a watercolour city at dusk"
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "bank": {"feature_bank": True},  # defaults: 4 frames, every 4th, fusion 0.8 at 0.98
    "bank_every_frame": {"feature_bank": True, "feature_bank_interval": 1},
    "bank_no_fusion": {"feature_bank": True, "feature_fusion": 0.0},
    "bank_fusion_0.9": {"feature_bank": True, "feature_fusion_threshold": 0.9},
    "smoothing_0.5": {"smoothing": 0.5, "smoothing_motion": False},
    "smoothing_0.5_motion": {"smoothing": 0.5, "smoothing_motion": True},
    "bank+smoothing_motion": {"feature_bank": True, "smoothing": 0.5, "smoothing_motion": True},
}
SETTLED = 0.1  # "fully visible": within 10 % of the change


def test_pattern(size: int) -> np.ndarray:
    """Colour bars over a horizontal gradient, with a dark disc: edges, flats and ramps."""
    y, x = np.mgrid[0:size, 0:size] / size
    bars = np.array([[230, 230, 230], [230, 230, 20], [20, 230, 230], [20, 230, 20], [230, 20, 230],
                     [230, 20, 20], [20, 20, 230], [30, 30, 30]], dtype=np.float64)
    image = bars[np.minimum((x * 8).astype(int), 7)] * (0.55 + 0.45 * y)[..., None]
    disc = (x - 0.5) ** 2 + (y - 0.6) ** 2 < 0.04
    image[disc] = (40, 40, 60)
    return image


def with_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).round().astype(np.uint8)


def inputs(size: int, frames: int, change: int, sigma: float, seed: int) -> dict[str, list[np.ndarray]]:
    base = test_pattern(size)
    rng = np.random.default_rng(seed)
    still = [with_noise(base, sigma, rng) for _ in range(frames)]
    changed = base.copy()
    q = size // 4
    changed[q : 2 * q, q : 2 * q] = 250.0
    step = [with_noise(base if i < change else changed, sigma, rng) for i in range(frames)]
    moving = []
    for i in range(frames):
        frame = base.copy()
        left = (i * size // 32) % (size - size // 8)
        frame[:, left : left + size // 8] = (250.0, 250.0, 250.0)
        moving.append(with_noise(frame, sigma, rng))
    return {"still": still, "step": step, "moving": moving}


def make_engine(c: ModelComponents, args: argparse.Namespace, option: dict[str, Any]) -> StreamEngine:
    engine = StreamEngine.from_components(
        c, t_index_list=args.t_index, width=args.size, height=args.size, cfg_type=args.cfg, seed=2,
        similarity_threshold=0.0,
    )
    engine.prepare(prompt=PROMPT, **option)
    return engine


def flicker(outputs: list[np.ndarray], skip: int) -> float:
    frames = [o.astype(np.float64) for o in outputs[skip:]]
    return float(np.mean([np.abs(b - a).mean() for a, b in zip(frames[:-1], frames[1:], strict=True)]))


def responsiveness(outputs: list[np.ndarray], change: int) -> int | None:
    """Frames from the change entering until the output is within SETTLED of its settled value."""
    before = outputs[change - 1].astype(np.float64)
    after = np.mean([o.astype(np.float64) for o in outputs[-3:]], axis=0)
    total = np.abs(after - before).mean()
    if total < 1e-6:
        return None  # the output did not change: nothing to time
    for i in range(change, len(outputs)):
        if np.abs(outputs[i].astype(np.float64) - after).mean() <= SETTLED * total:
            return i - change
    return None


def components_for(args: argparse.Namespace) -> ModelComponents:
    if args.model == "sd-turbo-arch":  # sd-turbo's UNet and a TAESD, random weights (benchmarks/gpu.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu import sd_turbo_architecture

        return sd_turbo_architecture(torch.device(args.device), getattr(torch, args.dtype))
    return load_components(args.model, device=args.device, dtype=args.dtype, cpu_threads=args.threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    components = components_for(args)
    frames = inputs(args.size, args.frames, args.change, args.noise, seed=0)
    names = ["plain", *(n for n in args.options if n != "plain")]
    engines = {name: make_engine(components, args, OPTIONS[name]) for name in names}
    outputs: dict[str, dict[str, list[np.ndarray]]] = {name: {k: [] for k in frames} for name in engines}
    times: dict[str, list[float]] = {name: [] for name in engines}
    cuda = engines["plain"].device.type == "cuda"
    for kind, sequence in frames.items():
        for engine in engines.values():
            engine.prepare()  # a fresh stream per input: empty bank, nothing to smooth against
        for i, frame in enumerate(sequence):
            for name, engine in engines.items():  # interleaved: a CPU burst hits every option alike
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = engine(frame)
                if cuda:
                    torch.cuda.synchronize()
                if i >= args.warmup:  # each input starts a fresh stream (and bank): time it once filled
                    times[name].append(time.perf_counter() - t0)
                outputs[name][kind].append(out)
    skip = args.warmup
    plain_ms = statistics.median(times["plain"]) * 1000
    plain_flicker = flicker(outputs["plain"]["still"], skip)
    results = {}
    for name in engines:
        ms = statistics.median(times[name]) * 1000
        fl = flicker(outputs[name]["still"], skip)
        smear = float(np.mean([np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
                               for a, b in zip(outputs[name]["moving"], outputs["plain"]["moving"], strict=True)]))
        results[name] = {
            "settings": OPTIONS[name],
            "flicker_levels": round(fl, 4),
            "flicker_vs_plain": round(fl / plain_flicker, 3) if plain_flicker > 0 else None,
            "responsiveness_frames": responsiveness(outputs[name]["step"], args.change),
            "smear_levels": round(smear, 4),
            "ms_per_frame": round(ms, 2),
            "time_vs_plain": round(ms / plain_ms, 3),
        }
    for engine in engines.values():
        engine.close()
    return {
        "benchmark": "temporal",
        "model": args.model,
        "device": str(engines["plain"].device),
        "dtype": args.dtype,
        "size": args.size,
        "t_index_list": args.t_index,
        "steps": len(args.t_index),
        "cfg_type": args.cfg,
        "frames_per_input": args.frames,
        "warmup_frames": skip,
        "change_at_frame": args.change,
        "sensor_noise_sigma_levels": args.noise,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "goal": "flicker_vs_plain ≤ 0.5 with the bank at time_vs_plain ≤ 1.3; responsiveness ≤ T + 2 frames",
        "options": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t-index", type=int, nargs="+", default=[32, 45])
    parser.add_argument("--cfg", default="self")
    parser.add_argument("--frames", type=int, default=24, help="frames per input sequence")
    parser.add_argument("--change", type=int, default=12, help="frame at which the step input changes")
    parser.add_argument("--warmup", type=int, default=6, help="frames left out of flicker and timing")
    parser.add_argument("--noise", type=float, default=3.0, help="sensor noise σ in uint8 levels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS),
                        help="options to run (plain is always run: the ratios are to it)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    report = run(args)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
