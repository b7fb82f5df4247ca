"""RingBuffer: the producer never blocks, the consumer gets the newest, drops are counted exactly,
and no frame tears under concurrent use."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnode.frames import Frame, RingBuffer

SHAPE = (8, 8, 3)


def image(value: int) -> np.ndarray:
    return np.full(SHAPE, value % 256, np.uint8)


def test_frame_now_stamps_monotonic_time() -> None:
    before = time.monotonic_ns()
    frame = Frame.now(image(1), seq=7)
    assert frame.seq == 7 and before <= frame.t_capture <= time.monotonic_ns()


def test_needs_two_slots() -> None:
    with pytest.raises(ValueError, match="at least 2 slots"):
        RingBuffer(SHAPE, slots=1)


def test_consumer_gets_newest_and_older_unread_frames_count_as_dropped() -> None:
    ring = RingBuffer(SHAPE, slots=4)
    for seq in range(3):
        assert ring.put(image(seq), seq, seq)
    frame = ring.get_latest(timeout=0)
    assert frame is not None and frame.seq == 2 and frame.image[0, 0, 0] == 2
    assert ring.dropped == 2 and ring.taken == 1 and ring.pending == 0


def test_producer_never_blocks_and_overwrites_the_oldest() -> None:
    ring = RingBuffer(SHAPE, slots=3)
    held = None
    ring.put(image(0), 0, 0)
    held = ring.get_latest(0)  # the consumer holds slot of frame 0 and never comes back
    t0 = time.perf_counter()
    for seq in range(1, 1001):
        assert ring.put(image(seq), seq, seq)
    assert time.perf_counter() - t0 < 1.0  # 1000 puts of a tiny frame: no waiting anywhere
    # Two unheld slots: the last two frames are still there, the other 998 were overwritten.
    assert ring.pending == 2 and ring.dropped == 998
    assert held is not None and held.seq == 0 and held.image[0, 0, 0] == 0  # the held frame is intact
    assert [ring.get_next(0).seq, ring.get_next(0).seq] == [999, 1000]


def test_empty_get_keeps_the_held_frame() -> None:
    ring = RingBuffer(SHAPE, slots=2)
    ring.put(image(5), 5, 0)
    frame = ring.get_latest(0)
    assert ring.get_latest(0.01) is None
    for seq in range(6, 10):
        ring.put(image(seq), seq, 0)  # must not write into the held slot
    assert frame.seq == 5 and frame.image.max() == 5


def test_ordered_mode_keeps_every_frame_and_the_producer_waits() -> None:
    ring = RingBuffer(SHAPE, slots=2, block=True)
    assert ring.put(image(0), 0, 0)
    assert ring.put(image(1), 1, 0)
    assert not ring.put(image(2), 2, 0, timeout=0.05)  # full: waits, then gives up
    got = []
    consumer_done = threading.Event()

    def consume() -> None:
        while (frame := ring.get_next(timeout=1.0)) is not None:
            got.append((frame.seq, int(frame.image[0, 0, 0])))
        consumer_done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    for seq in range(2, 50):
        assert ring.put(image(seq), seq, 0, timeout=5.0)
    ring.close()
    thread.join(5.0)
    assert consumer_done.is_set()
    assert got == [(s, s % 256) for s in range(50)]
    assert ring.dropped == 0 and ring.puts == 50


def test_close_wakes_the_consumer_and_leftovers_can_still_be_taken() -> None:
    ring = RingBuffer(SHAPE, slots=3)
    ring.put(image(1), 1, 0)
    ring.close()
    assert not ring.put(image(2), 2, 0)
    assert not ring.ended
    assert ring.get_next(0).seq == 1
    assert ring.ended
    t0 = time.perf_counter()
    assert ring.get_latest(timeout=5.0) is None
    assert time.perf_counter() - t0 < 0.5


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(2, 6), ops=st.lists(st.sampled_from(["put", "latest", "next", "release"]), max_size=60))
def test_counts_match_a_simple_model(slots: int, ops: list[str]) -> None:
    """Single-threaded: every put is taken, dropped or pending — exactly, after any sequence."""
    ring = RingBuffer(SHAPE, slots=slots)
    ready: deque[int] = deque()
    held = False
    dropped = 0
    seq = 0
    for op in ops:
        if op == "put":
            if len(ready) == slots - held:
                ready.popleft()
                dropped += 1
            ready.append(seq)
            ring.put(image(seq), seq, seq)
            seq += 1
        elif op in ("latest", "next"):
            frame = ring.get_latest(0) if op == "latest" else ring.get_next(0)
            if not ready:
                assert frame is None
                continue
            expected = ready.pop() if op == "latest" else ready.popleft()
            if op == "latest":
                dropped += len(ready)
                ready.clear()
            held = True
            assert frame is not None and frame.seq == expected and frame.image[0, 0, 0] == expected % 256
        else:
            ring.release()
            held = False
        assert ring.dropped == dropped
        assert ring.pending == len(ready)
        assert ring.puts == ring.taken + ring.dropped + ring.pending


@pytest.mark.parametrize("block", [False, True])
def test_no_torn_frames_under_concurrent_use(block: bool) -> None:
    """A producer floods frames whose every byte is seq % 256 while a consumer checks each one."""
    shape = (64, 64, 3)
    ring = RingBuffer(shape, slots=3, block=block)
    frames = [np.full(shape, v, np.uint8) for v in range(256)]
    errors: list[str] = []
    seen: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        seq = 0
        while not stop.is_set():
            if ring.put(frames[seq % 256], seq, seq, timeout=0.1):
                seq += 1
        ring.close()

    def consume() -> None:
        while (frame := (ring.get_next(0.5) if block else ring.get_latest(0.5))) is not None:
            img = frame.image
            value = frame.seq % 256
            # Read the pixels slowly, while the producer keeps writing other slots.
            if not (img.min() == img.max() == value):
                errors.append(f"frame {frame.seq}: pixels {img.min()}..{img.max()}, expected {value}")
            seen.append(frame.seq)
            if seen and len(seen) % 50 == 0:
                time.sleep(0.001)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(5.0)
    assert not errors, errors[:5]
    assert len(seen) > 20
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # newest-first never goes back in time
    if block:
        assert seen == list(range(len(seen))) and ring.dropped == 0
    assert ring.puts == ring.taken + ring.dropped + ring.pending
