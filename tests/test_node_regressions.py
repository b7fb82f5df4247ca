"""Regressions of the node that each stopped or corrupted a show, one test per bug (issue "One
live-parameter schema…", item 5). Each failed on the code before its fix; they use only the
node's public surface (Node, its config, its queue, the transports), so they keep meaning the
same thing whatever the node's insides become."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from streamnode.config import load_config
from streamnode.control.updates import Update
from streamnode.frames import Frame
from streamnode.io import base
from streamnode.io.base import Retry, UriParams
from streamnode.io.file import FileSink
from streamnode.node import Node, PassThroughEngine, StartupError

SIZE = 64


class Recorder:
    """A sink that records what it gets; `?pace=N` makes it a paced sink like a virtual camera."""

    instances: dict[str, Recorder] = {}

    def __init__(self, uri: str, pace: float | None) -> None:
        self.uri = uri
        self.pace_fps = pace
        self.seqs: list[int] = []
        self.sent_at: list[float] = []
        Recorder.instances[uri] = self

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: Any) -> Recorder:
        pace = params.number("pace", 0.0)
        params.done()
        return cls(uri, pace or None)

    def open(self) -> None:
        pass

    def send(self, frame: Frame) -> None:
        self.seqs.append(frame.seq)
        self.sent_at.append(time.monotonic())

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def recorder() -> Iterator[None]:
    Recorder.instances.clear()
    base.register_sink("recorder", Recorder)
    yield
    base._SINKS.pop("recorder", None)


def config(**overrides: Any):  # noqa: ANN201
    values = {"source.uri": "test://moving?fps=60", "sinks": ["recorder://a"], "stream.width": SIZE,
              "stream.height": SIZE, "runtime.engine": "passthrough", "osc.enabled": False,
              "runtime.metrics_interval_s": 60.0}
    values.update(overrides)
    return load_config(overrides=values)


def run_with_deadline(node: Node, seconds: float) -> int | None:
    """node.run() in a thread; its exit code, or None if it was still running after `seconds`
    (then it is stopped, so a failing test does not leave it behind)."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(node.run()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        node.stop()
        thread.join(5)
        return None
    return result[0]


def test_a_source_away_for_more_than_an_hour_is_still_retried() -> None:
    """`first * 2**attempts` overflowed a float after 1024 failures (about 77 minutes of an
    unplugged camera at 5 s): OverflowError inside the capture worker, which then died."""
    retry = Retry("source webcam://0", first=0.25, longest=5.0, log=logging.getLogger("test"))
    for _ in range(3000):
        retry.failed(ConnectionError("unplugged"))
    assert 0.0 < retry.wait_s() <= 5.0
    retry.succeeded()
    assert not retry.failing


def test_a_paced_sink_lets_a_finite_run_end() -> None:
    """A paced sink (vcam://) always holds a frame to repeat, so its thread never saw the mailbox
    end: with --max-frames the node never exited, and after close the loop spun at 100% CPU."""
    node = Node(config(**{"sinks": ["recorder://cam?pace=30"], "runtime.max_frames": 10}))
    assert run_with_deadline(node, 15) == 0, "the run did not end"
    assert node.busy_threads() == []
    assert Recorder.instances["recorder://cam?pace=30"].seqs  # it did get frames


def test_live_frame_groups_and_bypass_have_one_writer_and_stop_at_max_frames() -> None:
    """With live F > 1 the presenter and /bypass both wrote into a mailbox built for one writer
    (an IndexError could kill the sink thread), frames_out had two writers, and --max-frames
    overshot."""
    errors: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    try:
        cfg = config(**{"stream.frame_buffer_size": 2, "source.uri": "test://moving?fps=120",
                        "runtime.max_frames": 60})
        node = Node(cfg, engine_factory=lambda c: PassThroughEngine(SIZE, SIZE))
        toggles = threading.Thread(target=lambda: [
            (node.queue.put(Update("bypass", i % 2 == 0)), time.sleep(0.01)) for i in range(200)], daemon=True)
        toggles.start()
        assert run_with_deadline(node, 20) == 0, "the run did not end"
    finally:
        threading.excepthook = old_hook
    assert errors == []
    assert node.frames_out == 60  # exactly: one writer counts, and it stops at the limit
    assert 0 < len(Recorder.instances["recorder://a"].seqs) <= 60  # live: a busy sink may skip one


def test_a_model_switch_during_warm_up_still_counts_the_streaming_time(tiny_model_path: Path) -> None:
    """A /model applied before the first frame left the streaming clock unset: --duration never
    ended the run and the summary said "no frames out"."""
    calls: list[str] = []

    def factory(cfg):  # noqa: ANN001, ANN202
        calls.append(cfg.model.id)
        if len(calls) == 1:
            time.sleep(0.5)  # the first engine is slow to load: the /model arrives meanwhile
        return PassThroughEngine(cfg.stream.width, cfg.stream.height)

    node = Node(config(**{"runtime.duration": 1.0, "osc.allow_model_switch": True}), engine_factory=factory)
    node.queue.put(Update("model", "another"))
    assert run_with_deadline(node, 20) == 0, "--duration never ended the run"
    assert calls == ["tiny", "another"]
    assert "frames out in" in node.summary() and node.frames_out > 0


def test_a_broken_osc_module_fails_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken import of the OSC module was swallowed: the node ran without its control surface
    and said so in one warning."""
    monkeypatch.setitem(sys.modules, "streamnode.control.osc", None)  # import fails as if broken
    node = Node(config(**{"osc.enabled": True, "osc.port": 0}))
    with pytest.raises(StartupError, match="OSC"):
        node.start()
    node.stop()


def _video_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _frame(seq: int) -> Frame:
    return Frame(np.full((SIZE, SIZE, 3), seq, np.uint8), seq, time.monotonic_ns())


def test_a_file_sink_reopened_after_a_failure_keeps_what_it_wrote(tmp_path: Path) -> None:
    """Reopened after a failed send, a file:// sink truncated the video or restarted the image
    numbers at 0 (overwriting the first frames)."""
    images = FileSink(tmp_path / "frames/", SIZE, SIZE, 30.0)
    images.open()
    for i in range(3):
        images.send(_frame(i))
    images.close()  # what the sink thread does after a failed send…
    images.open()  # …and then, with backoff
    for i in range(3, 5):
        images.send(_frame(i))
    images.close()
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_{i:06d}.png" for i in range(5)]

    video = FileSink(tmp_path / "show.avi", SIZE, SIZE, 30.0, codec="MJPG")
    video.open()
    for i in range(10):
        video.send(_frame(i))
    video.close()
    video.open()
    for i in range(10, 17):
        video.send(_frame(i))
    video.close()
    files = sorted(tmp_path.glob("show*.avi"))
    assert len(files) == 2 and sum(_video_frames(f) for f in files) == 17
