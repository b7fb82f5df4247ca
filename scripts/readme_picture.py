"""Draw docs/tiny-model.png: what the embedded tiny model does to the moving test pattern.

    PYTHONPATH=. python scripts/readme_picture.py [--out docs/tiny-model.png]

Tiles, left to right: the input frame; the output with prompt "fire"; with "a stormy ocean";
with the two blended half and half; the empty prompt with a "neon" brush on a disc. All run
through the ordinary engine (t_index [35], the demo preset's), so the picture stays true to the
shipped weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from streamnode.diffusion.models import load_components
from streamnode.diffusion.stream import StreamEngine
from streamnode.io.test_pattern import TestPatternSource

TILE = 160
LABEL = 22


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/tiny-model.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    components = load_components("tiny", device="cpu", dtype="float32", cpu_threads=1)
    source = TestPatternSource("moving", TILE, TILE, pace=False)
    source.open()
    for _ in range(20):
        frame = source.read(1.0)
    frame = frame.copy()

    def output(brush: dict | None = None, **prompt: object) -> np.ndarray:
        engine = StreamEngine.from_components(components, t_index_list=[35], width=TILE, height=TILE,
                                              cfg_type="none", seed=2, similarity_threshold=0.0)
        engine.prepare(negative_prompt="", guidance_scale=1.0, prompt_transition_frames=0, **prompt)
        if brush:
            engine.set_brush(0, **brush)
        engine(frame)
        return np.asarray(engine(frame)).astype(np.uint8)

    tiles = [
        ("input", frame),
        ("fire", output(prompt="fire")),
        ("a stormy ocean", output(prompt="a stormy ocean")),
        ("blend 50/50", output(prompt_blend=[("fire", 0.5), ("a stormy ocean", 0.5)])),
        ("brush: neon disc", output(prompt="", brush={"prompt": "neon", "circle": (0.5, 0.5, 0.3)})),
    ]
    row = []
    for label, image in tiles:
        tile = np.full((TILE + LABEL, TILE, 3), 255, np.uint8)
        tile[:TILE] = image
        cv2.putText(tile, label, (4, TILE + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        row.append(tile)
        row.append(np.full((TILE + LABEL, 4, 3), 255, np.uint8))
    picture = np.concatenate(row[:-1], axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 96 colours: the tiles' grain makes a full-colour PNG ~130 KiB; this one is ~20 KiB.
    Image.fromarray(picture).quantize(colors=96, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
