"""`streamnode run` as a subprocess: frames read from shm:// with the documented reader, SIGTERM →
exit 0 within 2 s, no shared-memory segment left; and once with the real engine on the tiny model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "shm-format.md"
pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="checks segment files under /dev/shm")


def doc_reader() -> tuple:
    section = DOC.read_text(encoding="utf-8").split("## Reading it", 1)[1]
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), scope)  # noqa: S102 - the documented reader
    return scope["open_frames"], scope["read_frame"]


def start_node(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "streamnode.cli", "run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_frames(name: str, proc: subprocess.Popen[str], want: int, timeout: float) -> list[tuple[int, int, np.ndarray]]:
    open_frames, read_frame = doc_reader()
    deadline = time.monotonic() + timeout
    shm = None
    while shm is None:
        try:
            shm = open_frames(name)
        except FileNotFoundError:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the node never created its segment"
            time.sleep(0.05)
    got = []
    last = 0
    try:
        while len(got) < want and time.monotonic() < deadline:
            frame = read_frame(shm, last)
            if frame is None:
                time.sleep(0.002)
                continue
            got.append(frame)
            last = frame[0]
    finally:
        shm.close()
    return got


def stop(proc: subprocess.Popen[str]) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, time.monotonic() - t0, err


def test_run_to_shm_then_sigterm() -> None:
    name = f"sn_e2e{uuid.uuid4().hex[:8]}"
    proc = start_node("--source", "test://moving?fps=60", "--sink", f"shm://{name}", "--sink", "null://",
                      "--engine", "passthrough", "--width", "96", "--height", "64", "--no-osc")
    try:
        frames = read_frames(name, proc, want=30, timeout=20)
    finally:
        rc, took, err = stop(proc)
    assert len(frames) == 30, err[-3000:]
    numbers = [n for n, _, _ in frames]
    assert numbers == sorted(numbers) and len(set(numbers)) == 30
    assert all(px.shape == (64, 96, 3) for _, _, px in frames)
    assert not np.array_equal(frames[0][2], frames[-1][2])  # the pattern moves
    latency_ms = [(time.monotonic_ns() - t) / 1e6 for _, t, _ in frames[-1:]]
    assert 0 < latency_ms[0] < 5000
    assert rc == 0, err[-3000:]
    assert took < 2.0, f"took {took:.2f} s to exit"
    assert not Path("/dev/shm", name).exists()
    assert "leaked" not in err


def test_sigint_also_exits_0() -> None:
    name = f"sn_int{uuid.uuid4().hex[:8]}"
    proc = start_node("--source", "test://bars", "--sink", f"shm://{name}", "--engine", "passthrough",
                      "--width", "64", "--height", "64", "--no-osc")
    assert read_frames(name, proc, want=1, timeout=30)  # running (a loaded machine imports slowly)
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and time.monotonic() - t0 < 2.0 and "SIGINT: shutting down" in err, err[-2000:]


def test_scripted_runs_end_by_themselves() -> None:
    proc = start_node("--source", "test://bars?fps=200", "--sink", "null://", "--engine", "passthrough",
                      "--width", "64", "--height", "64", "--no-osc", "--max-frames", "20")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "20 frames out" in err, err[-2000:]
    t0 = time.monotonic()
    proc = start_node("--source", "test://bars", "--sink", "null://", "--engine", "passthrough",
                      "--width", "64", "--height", "64", "--no-osc", "--duration", "1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - t0 < 15, err[-2000:]


def test_bad_flags_exit_2_and_bad_uris_exit_1() -> None:
    proc = start_node("--width", "100", "--no-osc")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "stream.width = 100" in err and "multiple of 8" in err
    proc = start_node("--source", "rtsp://cam", "--no-osc", "--engine", "passthrough")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "no source for rtsp://" in err


@pytest.mark.slow
def test_real_engine_end_to_end(tiny_model_path: Path) -> None:
    """test pattern → the StreamEngine on the tiny model (CPU) → shm, then SIGTERM."""
    name = f"sn_eng{uuid.uuid4().hex[:8]}"
    proc = start_node("--source", "test://moving?fps=15", "--sink", f"shm://{name}", "--model", "tiny",
                      "--device", "cpu", "--accel", "eager", "--width", "64", "--height", "64", "--no-osc",
                      "--set", "stream.t_index_list=[20, 35]", "--set", "stream.cfg_type=self",
                      "--set", "stream.similarity_threshold=0", "--prompt", "a lighthouse")
    try:
        frames = read_frames(name, proc, want=4, timeout=120)
    finally:
        rc, took, err = stop(proc)
    assert len(frames) == 4, err[-3000:]
    for _, _, px in frames:
        assert px.shape == (64, 64, 3) and px.dtype == np.uint8
    assert rc == 0 and took < 2.5, (rc, took, err[-3000:])
    assert "first frame in" in err and "engine" in err
    assert not Path("/dev/shm", name).exists()
