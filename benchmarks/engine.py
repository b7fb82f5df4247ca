"""Stream-batch engine speed on one machine, printed as JSON.

For each T in --steps: frames/s of
  - the stream batch (`StreamEngine.__call__`, one UNet call of T·F rows per frame),
  - the same T steps one after another (`StreamEngine.reference`, T UNet calls of F rows),
  - diffusers' `AutoPipelineForImage2Image` built on the very same components, run on the
    same timesteps (custom `timesteps=[τ_0 … τ_{T−1}]`, strength 1: exactly T UNet calls),
    same size, no CFG (guidance 1), called as users call it (prompt text, numpy image in,
    numpy image out);
and the host overhead per frame of the stream: wall time minus the time spent inside the
UNet, VAE and text-encoder calls (everything else the engine does: conversion, latent math,
bookkeeping). The engines run with cfg_type "none" so the three do the same model work.

The methods are timed interleaved, frame by frame, and each figure is the median over frames,
so a neighbour's burst of CPU use hits all of them alike. Run from the repository root:

    python benchmarks/engine.py                      # tiny, CPU, 256², T = 1 2 4
    python benchmarks/engine.py --overhead-size 512  # plus host overhead at 512²
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.models import ModelComponents, load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

T_INDEX = {1: [32], 2: [32, 45], 3: [24, 32, 45], 4: [16, 24, 32, 45]}
PROMPT = "a watercolor city at night"


class Timer:
    """Accumulates seconds spent inside wrapped callables (synchronising CUDA around them)."""

    def __init__(self, device: torch.device) -> None:
        self.inside: dict[str, float] = {}
        self._cuda = device.type == "cuda"

    def reset(self) -> None:
        self.inside = {}

    @property
    def total(self) -> float:
        return sum(self.inside.values())

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self._cuda:
                torch.cuda.synchronize()
            self.inside[name] = self.inside.get(name, 0.0) + time.perf_counter() - t0
            return out

        return timed


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def build_diffusers_pipeline(c: ModelComponents) -> Any:
    from diffusers import AutoPipelineForImage2Image, LCMScheduler, StableDiffusionPipeline

    base = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=LCMScheduler.from_config(c.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = AutoPipelineForImage2Image.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frames_pool(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def timed_frames(run: Callable[[np.ndarray], Any], frames: list[np.ndarray], device: torch.device) -> float:
    """Seconds per frame over `frames`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for frame in frames:
        run(frame)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(frames)


def instrument(engine: StreamEngine, timer: Timer) -> None:
    engine.unet_call = timer.wrap("unet", engine.unet_call)
    engine.vae_encode = timer.wrap("vae", engine.vae_encode)
    engine.vae_decode = timer.wrap("vae", engine.vae_decode)
    c = engine.components
    c.encode_text = timer.wrap("text", c.encode_text)  # per-instance: the engine's cache calls it


def bench_steps(c: ModelComponents, steps: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    engine = StreamEngine.from_components(
        c, t_index_list=T_INDEX[steps], width=size, height=size, cfg_type="none", similarity_threshold=0.0
    )
    engine.prepare(prompt=PROMPT, guidance_scale=1.0)
    timer = Timer(c.device)
    instrument(engine, timer)
    pipe = build_diffusers_pipeline(c)
    timesteps = [int(t) for t in engine.schedule.timesteps]
    generator = torch.Generator("cpu")

    def diffusers_frame(frame: np.ndarray) -> Any:
        image = frame.astype(np.float32)[None] / 255.0
        return pipe(
            PROMPT, image=image, timesteps=timesteps, strength=1.0, guidance_scale=1.0,
            output_type="np", generator=generator.manual_seed(2),
        ).images[0]

    unet_forwards = [0]
    hook = c.unet.register_forward_pre_hook(lambda *_: unet_forwards.__setitem__(0, unet_forwards[0] + 1))
    frames = frames_pool(args.frames, size)
    with quiet_diffusers():
        # Warm-up: fills the stream, lets the allocator and oneDNN settle for every method.
        for frame in frames[: args.warmup]:
            engine(frame)
            engine.reference(frame)
            diffusers_frame(frame)
        before = unet_forwards[0]
        diffusers_frame(frames[0])
        diffusers_unet_calls = unet_forwards[0] - before
        hook.remove()

        # Interleaved frame by frame: a neighbour's CPU burst hits the three methods alike, and
        # the median per frame ignores the frames it hit hardest.
        stream, sequential, pipeline, overhead, unet_stream, unet_seq, vae = [], [], [], [], [], [], []
        for _ in range(args.rounds):
            for frame in frames:
                timer.reset()
                per_frame = timed_frames(engine, [frame], c.device)
                stream.append(per_frame)
                overhead.append(per_frame - timer.total)
                unet_stream.append(timer.inside.get("unet", 0.0))
                vae.append(timer.inside.get("vae", 0.0))
                timer.reset()
                sequential.append(timed_frames(engine.reference, [frame], c.device))
                unet_seq.append(timer.inside.get("unet", 0.0))
                pipeline.append(timed_frames(diffusers_frame, [frame], c.device))

    fps = {name: 1.0 / statistics.median(v) for name, v in
           (("stream", stream), ("sequential", sequential), ("diffusers", pipeline))}
    return {
        "steps": steps,
        "t_index_list": T_INDEX[steps],
        "timesteps": timesteps,
        "batch_rows": engine.batch_rows,
        "fps_stream": round(fps["stream"], 3),
        "fps_sequential": round(fps["sequential"], 3),
        "fps_diffusers_img2img": round(fps["diffusers"], 3),
        "diffusers_unet_calls_per_frame": diffusers_unet_calls,
        "stream_vs_sequential": round(fps["stream"] / fps["sequential"], 3),
        "stream_vs_diffusers": round(fps["stream"] / fps["diffusers"], 3),
        "host_overhead_ms": round(1e3 * statistics.median(overhead), 3),
        "unet_ms_per_frame_stream": round(1e3 * statistics.median(unet_stream), 2),
        "unet_ms_per_frame_sequential": round(1e3 * statistics.median(unet_seq), 2),
        "vae_ms_per_frame": round(1e3 * statistics.median(vae), 2),
    }


def bench_overhead(c: ModelComponents, steps: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    engine = StreamEngine.from_components(
        c, t_index_list=T_INDEX[steps], width=size, height=size, cfg_type="self", similarity_threshold=0.0
    )
    engine.prepare(prompt=PROMPT)
    timer = Timer(c.device)
    instrument(engine, timer)
    frames = frames_pool(max(4, args.frames // 2), size, seed=1)
    for frame in frames[: args.warmup]:
        engine(frame)
    overhead = []
    for _ in range(args.rounds):
        for frame in frames:
            timer.reset()
            overhead.append(timed_frames(engine, [frame], c.device) - timer.total)
    return {
        "size": size,
        "steps": steps,
        "cfg_type": "self",
        "host_overhead_ms": round(1e3 * statistics.median(overhead), 3),
        "host_overhead_ms_min": round(1e3 * min(overhead), 3),
    }


def bench_compile(model: str, steps: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Eager vs `--accel compile` (torch.compile, inductor, channels-last) on the same frames,
    interleaved. Each side has its own copy of the weights: compiling converts its modules'
    memory layout, which must not change what the eager side runs."""
    from streamnode.accel import accelerate, describe_seams, restore

    engines = []
    for _ in range(2):
        with quiet_diffusers():
            comps = load_components(model, device=args.device, dtype=args.dtype)
        engine = StreamEngine.from_components(
            comps, t_index_list=T_INDEX[steps], width=size, height=size, cfg_type="none", similarity_threshold=0.0
        )
        engine.prepare(prompt=PROMPT)
        engines.append(engine)
    eager, compiled = engines
    backend = accelerate(compiled, "compile")
    frames = frames_pool(args.frames, size, seed=2)
    t0 = time.perf_counter()
    compiled(frames[0])  # the first call compiles every seam for this shape
    first_call_s = time.perf_counter() - t0
    compile_s = sum(v.get("compile_seconds", 0.0) for v in describe_seams(compiled).values())
    for frame in frames[: args.warmup]:
        eager(frame)
        compiled(frame)
    t_eager, t_compiled = [], []
    for _ in range(args.rounds):
        for frame in frames:
            t_eager.append(timed_frames(eager, [frame], eager.components.device))
            t_compiled.append(timed_frames(compiled, [frame], compiled.components.device))
    restore(compiled)
    fps_eager, fps_compiled = 1 / statistics.median(t_eager), 1 / statistics.median(t_compiled)
    return {
        "steps": steps,
        "size": size,
        "backend": backend,  # "eager" here means compile could not be set up (the log says why)
        "fps_eager": round(fps_eager, 3),
        "fps_compile": round(fps_compiled, 3),
        "compile_vs_eager": round(fps_compiled / fps_eager, 3),
        "first_call_s": round(first_call_s, 2),
        "compile_seconds": round(compile_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], choices=sorted(T_INDEX))
    parser.add_argument("--frames", type=int, default=8, help="frames per timed round and method")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overhead-size", type=int, default=512, help="0 skips the host-overhead run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: the loader's budget, half the cores on a CPU)")
    parser.add_argument("--compile-steps", type=int, nargs="*", default=[1], choices=sorted(T_INDEX),
                        help="steps to time eager vs torch.compile at (none: skip; each costs a compile)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' config nags, not results
    with quiet_diffusers():
        c = load_components(args.model, device=args.device, dtype=args.dtype, cpu_threads=args.threads or None)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "model": args.model,
        "device": str(c.device),
        "dtype": str(c.dtype).removeprefix("torch."),
        "size": args.size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "frames_per_method_and_round": args.frames,
        "rounds": args.rounds,
        "runs": [bench_steps(c, steps, args.size, args) for steps in args.steps],
    }
    if args.overhead_size:
        result["host_overhead_at"] = [bench_overhead(c, steps, args.overhead_size, args) for steps in (1, 4)]
    if args.compile_steps:
        result["compile_vs_eager"] = [bench_compile(args.model, steps, args.size, args) for steps in args.compile_steps]
    runs = {r["steps"]: r for r in result["runs"]}
    targets: dict[str, Any] = {}
    if 1 in runs:
        targets["t1_not_slower_than_diffusers"] = runs[1]["stream_vs_diffusers"] >= 1.0
    if 4 in runs:
        targets["t4_stream_vs_sequential_ge_1.3"] = runs[4]["stream_vs_sequential"] >= 1.3
    if args.overhead_size == 512:
        targets["host_overhead_le_2ms_at_512"] = all(r["host_overhead_ms"] <= 2.0 for r in result["host_overhead_at"])
    result["targets_met"] = targets
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
