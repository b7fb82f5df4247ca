"""The trained tiny model against another tiny-class model folder, side by side, printed as JSON.

    python benchmarks/tiny_speed.py --baseline ~/.cache/streamnode/models/tiny-v2

Both run the demo preset's engine (256², t_index [35], cfg none, eager PyTorch, CPU) on the
moving test pattern; frames alternate between the two, so a neighbour's burst of CPU use hits
both alike, and each figure is the median frame time. `ratio` = trained fps / baseline fps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.diffusion.models import load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402
from streamnode.io.test_pattern import TestPatternSource  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a tiny-class diffusers folder to compare with")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    engines = {}
    for name, model in (("trained", "tiny"), ("baseline", str(args.baseline))):
        components = load_components(model, device="cpu", dtype="float32", cpu_threads=args.threads)
        engine = StreamEngine.from_components(components, t_index_list=[35], width=args.size, height=args.size,
                                              cfg_type="none", seed=2, similarity_threshold=0.0)
        engine.prepare(prompt="a watercolour city at dusk", negative_prompt="", guidance_scale=1.0)
        engines[name] = engine
    source = TestPatternSource("moving", args.size, args.size, pace=False)
    source.open()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(args.frames + 3):
        frame = np.asarray(source.read(1.0))
        for name, engine in engines.items():
            start = time.perf_counter()
            engine(frame)
            if i >= 3:  # warm-up frames
                times[name].append(time.perf_counter() - start)
    fps = {name: 1.0 / statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "tiny_speed",
        "size": args.size,
        "threads": args.threads,
        "frames": args.frames,
        "fps": {k: round(v, 2) for k, v in fps.items()},
        "ratio": round(fps["trained"] / fps["baseline"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
