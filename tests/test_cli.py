"""The two user-facing promises of issue 2: `streamnode demo` works, bad config fails fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2

STREAMNODE = [sys.executable, "-m", "streamnode.cli"]


def test_bad_set_value_exits_nonzero_with_one_line_naming_the_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [*STREAMNODE, "run", "--preset", "demo", "--set", "stream.guidance_scale=banana"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "stream.guidance_scale" in lines[0] and "banana" in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()  # failed before opening anything


def test_unknown_preset_and_bad_flag_fail_fast(tmp_path: Path) -> None:
    out = subprocess.run([*STREAMNODE, "run", "--preset", "nope"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "streamnode presets" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*STREAMNODE, "run", "--preset", "demo", "--width", "100"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "stream.width" in out.stderr and "multiple of 8" in out.stderr


def test_demo_writes_a_playable_video_and_prints_fps_and_latency(tmp_path: Path) -> None:
    out = subprocess.run(
        [*STREAMNODE, "demo", "--duration", "2"], capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = [line for line in out.stderr.splitlines() if line.startswith("streamnode: ")][-1]
    fps = re.search(r"\(([\d.]+) fps\)", summary)
    assert fps and float(fps.group(1)) > 0, summary
    assert re.search(r"latency p50 [\d.]+ ms", summary), summary
    video = tmp_path / "out" / "demo.mp4"
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) >= 2
    assert frames[0].shape == (256, 256, 3)


def test_a_hub_model_that_is_not_here_fails_with_one_actionable_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [*STREAMNODE, "run", "--preset", "sd-turbo", "--source", "test://bars", "--sink", "null://", "--no-osc"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("streamnode: no frames out:") and "--model tiny" in last, last


def test_bench_times_the_preset_as_the_node_builds_it(tmp_path: Path) -> None:
    import json

    out = subprocess.run([*STREAMNODE, "bench", "--preset", "demo", "--frames", "3", "--warmup", "1"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["preset"] == "demo" and result["size"] == [256, 256] and result["fps"] > 0
