"""file://: videos and image folders in; playable videos and image folders out; and a
--no-drop render that keeps every frame in order."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamnode.config import load_config
from streamnode.frames import Frame
from streamnode.io.base import (
    SourceEnded,
    TransportError,
    TransportOptions,
    create_sink,
    open_sink,
    open_source,
)
from streamnode.node import Node

LEVELS = [i * 8 for i in range(30)]  # frame i is a flat grey of level 8·i: survives lossy codecs


def write_video(path: Path, levels: list[int], size: tuple[int, int] = (64, 48), fps: float = 25.0,
                codec: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
    assert writer.isOpened()
    for level in levels:
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()
    return path


def read_levels(path: Path) -> list[int]:
    cap = cv2.VideoCapture(str(path))
    levels = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        levels.append(int(round(frame[8:-8, 8:-8].mean())))
    cap.release()
    return levels


def close_to(got: list[int], want: list[int], tol: int = 5) -> bool:
    """Same count, each level within the codec's error, and in the same order (levels are 8 apart)."""
    in_order = all((b > a) == (y > x) for a, b, x, y in zip(got, got[1:], want, want[1:], strict=False))
    return len(got) == len(want) and in_order and all(abs(g - w) <= tol for g, w in zip(got, want, strict=True))


def test_video_source_loops_or_ends(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.avi", LEVELS[:5], fps=12.5)
    options = TransportOptions(realtime=False)
    with open_source(f"file://{clip}", options) as src:
        assert src.fps == pytest.approx(12.5)
        got = [int(src.read(0.1).mean()) for _ in range(7)]
    assert close_to(got, LEVELS[:5] + LEVELS[:2])
    with open_source(f"file://{clip}?loop=0", options) as src:
        for _ in range(5):
            assert src.read(0.1).shape == (48, 64, 3)
        with pytest.raises(SourceEnded):
            src.read(0.1)


def test_image_folder_source_in_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):  # frame10 must come after frame2
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), np.full((8, 8, 3), i, np.uint8))
    with open_source(f"file://{tmp_path}?loop=0", TransportOptions(realtime=False, fps=5)) as src:
        assert src.fps == 5
        got = [int(src.read(0.1)[0, 0, 0]) for _ in range(3)]
        with pytest.raises(SourceEnded):
            src.read(0.1)
    assert got == [1, 2, 10]


def test_missing_and_unwritable_paths_fail_at_startup(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="no such file"):
        open_source(f"file://{tmp_path}/nope.mp4")
    with pytest.raises(TransportError, match="unknown video type"):
        create_sink(f"file://{tmp_path}/out.xyz")


@pytest.mark.parametrize("name", ["out.mp4", "out.avi"])
def test_video_sink_writes_a_playable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "sub" / name
    options = TransportOptions(width=64, height=48, fps=24, realtime=False)
    with open_sink(f"file://{path}", options) as sink:
        for level in LEVELS[:10]:
            sink.send(Frame(np.full((48, 64, 3), level, np.uint8), 0, 0))
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(24)
    cap.release()
    assert close_to(read_levels(path), LEVELS[:10])


def test_live_video_plays_back_at_the_speed_the_node_ran(tmp_path: Path) -> None:
    """A node producing 8 fps into a 24 fps file: each output fills ~3 container frames, so the
    file lasts as long as the run did instead of playing 3x fast."""
    path = tmp_path / "live.avi"
    options = TransportOptions(width=64, height=48, fps=24, realtime=True)
    start = time.monotonic()
    with open_sink(f"file://{path}", options) as sink:
        for i, level in enumerate(LEVELS[:6]):
            while time.monotonic() < start + i / 8:
                time.sleep(0.002)
            sink.send(Frame(np.full((48, 64, 3), level, np.uint8), i, 0))
    elapsed = time.monotonic() - start
    levels = read_levels(path)
    assert abs(len(levels) - elapsed * 24) <= 3, (len(levels), elapsed)
    distinct = [lv for j, lv in enumerate(levels) if j == 0 or abs(lv - levels[j - 1]) > 3]
    assert close_to(distinct, LEVELS[:6])  # every output shown, in order, each held ~3 frames


def test_folder_sink_writes_numbered_images(tmp_path: Path) -> None:
    with open_sink(f"file://{tmp_path}/frames/", TransportOptions(width=16, height=8)) as sink:
        for i in range(3):
            sink.send(Frame(np.full((8, 16, 3), i * 50, np.uint8), i, 0))
    files = sorted((tmp_path / "frames").iterdir())
    assert [f.name for f in files] == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
    assert cv2.imread(str(files[2]))[0, 0, 0] == 100


def test_file_to_file_no_drop_keeps_count_and_order(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "in.avi", LEVELS, size=(80, 48))
    out = tmp_path / "out.mp4"
    config = load_config(overrides={
        "source.uri": f"file://{clip}", "source.loop": False, "sinks": [f"file://{out}"],
        "stream.width": 64, "stream.height": 64, "source.fit": "stretch",
        "runtime.no_drop": True, "runtime.engine": "passthrough", "runtime.ring_slots": 2, "osc.enabled": False,
    })
    node = Node(config)
    assert node.run() == 0
    assert node.frames_in == node.frames_out == len(LEVELS)
    assert node.status()["dropped"] == 0
    cap = cv2.VideoCapture(str(out))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(25)  # the source's own rate
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (64, 64)
    cap.release()
    assert close_to(read_levels(out), LEVELS)
