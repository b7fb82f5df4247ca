"""shm://: round trips in one process and across two, a reader written only from
docs/shm-format.md, and no segment left behind when either side crashes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from streamnode.frames import Frame
from streamnode.io.base import TransportError, TransportOptions, create_sink, open_sink, open_source
from streamnode.io.shm import HEADER_SIZE, MAGIC, SLOTS, ShmSink, ShmSource, pid_alive, segment_size

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "shm-format.md"
OPTIONS = TransportOptions(width=48, height=32)
pytestmark = pytest.mark.skipif(os.name != "posix" or not Path("/dev/shm").is_dir(),
                                reason="checks segment files under /dev/shm (Linux)")


def unique(prefix: str = "sn_t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def segment_exists(name: str) -> bool:
    return Path("/dev/shm", name).exists()


def doc_reader_code() -> str:
    """The reader exactly as docs/shm-format.md prints it (the first python block under 'Reading it')."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Reading it"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def frame_of(n: int, shape: tuple[int, int, int] = (32, 48, 3)) -> np.ndarray:
    img = np.full(shape, n % 256, np.uint8)
    img[0, 0] = (n // 256) % 256  # a corner says more of the number
    return img


@pytest.mark.parametrize("fmt", ["rgb", "bgr", "rgba", "bgra"])
def test_round_trip_in_process(fmt: str) -> None:
    name = unique()
    rng = np.random.default_rng(0)
    with open_sink(f"shm://{name}?format={fmt}", OPTIONS) as sink, open_source(f"shm://{name}", OPTIONS) as source:
        assert source.read(0.01) is None  # nothing written yet
        for n in range(1, 6):
            img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
            sink.send(Frame(img, n, 1000 + n))
            got = source.read(0.5)
            assert got is not None and got.shape == (32, 48, 3)
            np.testing.assert_array_equal(got, img)
        assert source.read(0.01) is None  # no new frame: None, not the old one again
    assert not segment_exists(name)


def test_header_fields() -> None:
    name = unique()
    with open_sink(f"shm://{name}", OPTIONS) as sink:
        sink.send(Frame(frame_of(1), 1, 12345))
        raw = Path("/dev/shm", name).read_bytes()
        assert len(raw) == segment_size(48, 32, 3)
        assert raw[:4] == MAGIC
        import struct

        version, hsize, w, h, c, fmt, slots, _slot_size, counter, ts, pid, state = struct.unpack_from(
            "<HHIIIIIIQQII", raw, 4)
        assert (version, hsize, w, h, c, fmt, slots) == (1, HEADER_SIZE, 48, 32, 3, 1, SLOTS)
        assert (counter, ts, pid, state) == (1, 12345, os.getpid(), 1)


def test_bad_names_and_formats_are_rejected_up_front() -> None:
    with pytest.raises(TransportError, match="segment name"):
        create_sink("shm://no/slashes", OPTIONS)
    with pytest.raises(TransportError, match="format"):
        create_sink("shm://ok?format=yuv", OPTIONS)


def test_torn_copy_is_detected_not_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that overwrites the slot during the copy: the reader discards that copy."""
    name = unique()
    sink = open_sink(f"shm://{name}", OPTIONS)
    source = ShmSource(name)
    source.open()
    try:
        sink.send(Frame(frame_of(1), 1, 0))
        real_copyto = np.copyto
        state = {"writes": 0}

        def copy_while_writer_runs(dst, src, *args, **kwargs):  # noqa: ANN001, ANN202
            real_copyto(dst, src, *args, **kwargs)
            if dst is source._rgb and state["writes"] < SLOTS:
                # The writer laps the reader: frames 2..4 land while frame 1 is being copied.
                monkeypatch.setattr(np, "copyto", real_copyto)
                for n in range(2, 2 + SLOTS):
                    sink.send(Frame(frame_of(n), n, 0))
                    state["writes"] += 1
                monkeypatch.setattr(np, "copyto", copy_while_writer_runs)

        monkeypatch.setattr(np, "copyto", copy_while_writer_runs)
        got = source.read(0.5)
        monkeypatch.setattr(np, "copyto", real_copyto)
        assert source.torn >= 1
        assert got is not None and got[1:].min() == got[1:].max() == 4  # the newest whole frame, never a mix
    finally:
        source.close()
        sink.close()


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from streamnode.frames import Frame
    from streamnode.io.shm import ShmSink
    name, count, fps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sink = ShmSink(name, 48, 32)
    sink.open()
    print("ready", flush=True)
    for n in range(1, count + 1):
        img = np.full((32, 48, 3), n % 256, np.uint8)
        img[0, 0] = (n // 256) % 256
        sink.send(Frame(img, n, time.monotonic_ns()))
        time.sleep(1 / fps)
    print("done", flush=True)
    sys.stdin.readline()  # stay until told
    sink.close()
""")


def start_writer(name: str, count: int, fps: float = 500.0) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, name, str(count), str(fps)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_two_processes_with_the_reader_from_the_docs() -> None:
    """Another process writes as fast as it can; the documented reader sees only whole frames."""
    name = unique()
    proc = start_writer(name, count=600, fps=2000.0)
    scope: dict[str, object] = {}
    exec(doc_reader_code(), scope)  # noqa: S102 - the doc's code is the thing under test
    open_frames, read_frame = scope["open_frames"], scope["read_frame"]
    try:
        shm = open_frames(name)
        seen = []
        last = 0
        deadline = time.monotonic() + 10
        while last < 600 and time.monotonic() < deadline:
            got = read_frame(shm, last)
            if got is None:
                time.sleep(0.0002)
                continue
            n, t, pixels = got
            assert pixels.shape == (32, 48, 3)
            assert pixels[0, 0, 0] == (n // 256) % 256 and pixels[1:].min() == pixels[1:].max() == n % 256, n
            assert n > last and 0 < t <= time.monotonic_ns()
            seen.append(n)
            last = n
        shm.close()
        assert last == 600 and len(seen) > 10
        # The reader's process is still alive, and the segment still belongs to the writer.
        assert segment_exists(name)
    finally:
        proc.communicate("\n", timeout=10)
    assert proc.returncode == 0
    assert not segment_exists(name)


def test_a_reader_process_exiting_leaves_the_writers_segment_alone() -> None:
    name = unique()
    with open_sink(f"shm://{name}", OPTIONS) as sink:
        sink.send(Frame(frame_of(7), 7, 1))
        reader = doc_reader_code() + textwrap.dedent(f"""
            shm = open_frames({name!r})
            n, t, px = read_frame(shm)
            print(n, int(px[1, 1, 0]))
            shm.close()
        """)
        out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["1", "7"], out.stderr  # the first frame published, its pixels
        assert "leaked" not in out.stderr
        assert segment_exists(name)  # a reader's exit must not delete the writer's segment
    assert not segment_exists(name)


def test_writer_crash_leaves_no_segment() -> None:
    """SIGKILL the writer: its resource tracker (a separate process) removes the segment."""
    name = unique()
    proc = start_writer(name, count=5)
    assert segment_exists(name)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 5
    while segment_exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not segment_exists(name)


def test_writer_and_tracker_killed_the_reader_and_the_next_writer_clean_up() -> None:
    """Even when nothing of the writer survives, the segment does not outlive the node."""
    name = unique()
    proc = start_writer(name, count=3)
    os.killpg(proc.pid, signal.SIGKILL)  # the writer and its resource tracker, at once
    proc.wait(10)
    time.sleep(0.1)
    assert segment_exists(name) and not pid_alive(proc.pid)

    # A new writer under that name takes over the stale segment.
    with open_sink(f"shm://{name}", OPTIONS) as sink:
        sink.send(Frame(frame_of(1), 1, 0))
    assert not segment_exists(name)

    # And a reader that finds a dead writer's segment removes it.
    proc = start_writer(name, count=3)
    source = ShmSource(name)
    source.open()
    try:
        assert source.read(0.5) is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while segment_exists(name) and time.monotonic() < deadline:
            source.read(0.1)
        assert not segment_exists(name)
    finally:
        source.close()


def test_a_live_writer_is_never_taken_over() -> None:
    name = unique()
    proc = start_writer(name, count=1)
    try:
        with pytest.raises(TransportError, match="already writing"):
            ShmSink(name, 48, 32).open()
    finally:
        proc.communicate("\n", timeout=10)
    assert not segment_exists(name)


def test_reader_waits_for_the_writer_and_follows_a_restart() -> None:
    name = unique()
    source = ShmSource(name)
    source.open()
    try:
        assert source.read(0.05) is None  # no segment yet: waiting, not an error
        proc = start_writer(name, count=3)
        got = None
        deadline = time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            got = source.read(0.1)
        assert got is not None
        proc.communicate("\n", timeout=10)  # the writer closes (state 2) and removes the segment
        proc = start_writer(name, count=5, fps=50)  # ... and comes back
        frames = []
        deadline = time.monotonic() + 6
        while len(frames) < 2 and time.monotonic() < deadline:
            if (img := source.read(0.1)) is not None:
                frames.append(int(img[1, 1, 0]))
        proc.communicate("\n", timeout=10)
        assert frames and frames[-1] >= 2
    finally:
        source.close()
    assert not segment_exists(name)


def test_writer_republishes_a_segment_someone_removed() -> None:
    """A careless reader's resource tracker (Python < 3.13) deletes the segment when it exits:
    the writer notices within a second and publishes a new one under the same name."""
    name = unique()
    with open_sink(f"shm://{name}", OPTIONS) as sink:
        sink.send(Frame(frame_of(1), 1, 0))
        os.unlink(f"/dev/shm/{name}")
        time.sleep(1.1)
        sink.send(Frame(frame_of(2), 2, 0))
        assert segment_exists(name)
        with open_source(f"shm://{name}", OPTIONS) as source:
            sink.send(Frame(frame_of(3), 3, 0))
            got = source.read(0.5)
            assert got is not None and got[1:].max() == 3
    assert not segment_exists(name)
