"""The node in one process, on the pass-through engine: control updates between frames, status,
a vanished source, a failing sink, --no-drop alignment, --max-frames, txt2img, OSC wiring and
the CLI's exit codes. (The node on the real engine: test_node_live.py.)"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from support import wait_for

from streamnode.commands.run import add_run_arguments, config_from_args, run_command
from streamnode.config import ConfigError, load_config
from streamnode.control.updates import Update
from streamnode.frames import Frame
from streamnode.io import base
from streamnode.io.base import SourceLost, UriParams
from streamnode.node import Node, PassThroughEngine, StartupError

SIZE = 64


class CaptureSink:
    """Keeps a copy of what it is sent (first pixel of each frame and its seq)."""

    instances: dict[str, CaptureSink] = {}

    def __init__(self, uri: str, fail_sends: int = 0, delay: float = 0.0) -> None:
        self.uri = uri
        self.pace_fps = None
        self.fail_sends = fail_sends
        self.delay = delay
        self.frames: list[tuple[int, int]] = []
        self.last: np.ndarray | None = None
        self.opens = 0
        self.closes = 0
        self.lock = threading.Lock()
        CaptureSink.instances[uri] = self

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: Any) -> CaptureSink:
        fail = params.integer("fail", 0)
        delay = params.number("delay", 0.0)
        params.done()
        return cls(uri, fail, delay)

    def open(self) -> None:
        self.opens += 1

    def send(self, frame: Frame) -> None:
        if self.fail_sends > 0:
            self.fail_sends -= 1
            raise OSError("receiver went away")
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.frames.append((frame.seq, int(frame.image[0, 0, 0])))
            self.last = frame.image.copy()

    def close(self) -> None:
        self.closes += 1


class ScriptedSource:
    """A source whose frames (flat grey levels) and outages the test controls."""

    instances: dict[str, ScriptedSource] = {}

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fps = None
        self.level = 100
        self.mode = "frames"  # frames | silent | lost
        self.opens = 0
        self._image = np.zeros((48, 80, 3), np.uint8)
        ScriptedSource.instances[uri] = self

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: Any) -> ScriptedSource:
        params.done()
        return cls(uri)

    def open(self) -> None:
        if self.mode == "lost":
            raise ConnectionError("not there")
        self.opens += 1

    def read(self, timeout: float) -> np.ndarray | None:
        time.sleep(min(timeout, 1 / 60))
        if self.mode == "lost":
            raise SourceLost("unplugged")
        if self.mode == "silent":
            return None
        self._image[:] = self.level
        return self._image

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_transports() -> Iterator[None]:
    CaptureSink.instances.clear()
    ScriptedSource.instances.clear()
    base.register_sink("capture", CaptureSink)
    base.register_source("scripted", ScriptedSource)
    yield
    base._SINKS.pop("capture", None)
    base._SOURCES.pop("scripted", None)


def config(**overrides: Any):  # noqa: ANN201
    values = {"source.uri": "test://moving?fps=60", "sinks": ["capture://a"], "stream.width": SIZE,
              "stream.height": SIZE, "runtime.engine": "passthrough", "osc.enabled": False,
              "runtime.metrics_interval_s": 60.0}
    values.update(overrides)
    return load_config(overrides=values)


class RecordingEngine(PassThroughEngine):
    """Pass-through that records the update() calls it accepted, and can invert."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self.updates: list[dict[str, Any]] = []
        self.invert = False

    def update(self, **kwargs: Any) -> None:
        super().update(**kwargs)
        self.updates.append(kwargs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = super().__call__(image)
        if self.invert:
            np.subtract(255, out, out=out)
        return out


@pytest.fixture
def engine_node() -> Iterator[tuple[Node, list[RecordingEngine]]]:
    engines: list[RecordingEngine] = []

    def factory(cfg):  # noqa: ANN001, ANN202
        engines.append(RecordingEngine(cfg.stream.width, cfg.stream.height))
        return engines[-1]

    node = Node(config(**{"source.uri": "scripted://cam", "osc.allow_model_switch": True}), engine_factory=factory)
    node.start()
    wait_for(lambda: node.status()["state"] == "streaming" and node.frames_out > 3, what="streaming")
    yield node, engines
    node.stop()


def test_status_has_every_key_the_osc_server_reads(engine_node: tuple[Node, list]) -> None:
    node, _ = engine_node
    st = node.status()
    for key in ("state", "fps_in", "fps_out", "engine_ms", "latency_ms_p50", "latency_ms_p95", "dropped",
                "skipped", "frames_out", "error", "params", "pause", "bypass"):
        assert key in st, key
    assert st["state"] == "streaming" and st["error"] == ""
    assert st["params"]["prompt"] == "" and st["params"]["guidance_scale"] == 1.2
    wait_for(lambda: node.status()["latency_ms_p50"] is not None, what="a latency sample")


def test_engine_keys_are_applied_between_frames_and_echoed(engine_node: tuple[Node, list]) -> None:
    node, engines = engine_node
    applied: list[Update] = []
    node.queue.on_report(lambda u, error: error is None and applied.append(u))
    node.queue.put(Update("prompt", "a red fox", "/prompt"))
    node.queue.put(Update("guidance_scale", 1.5, "/guidance_scale"))
    wait_for(lambda: len(applied) == 2, what="two applied updates")
    received = {k: v for update in engines[0].updates for k, v in update.items()}  # together or apart
    assert received["prompt"] == "a red fox" and received["guidance_scale"] == 1.5
    assert node.status()["params"]["prompt"] == "a red fox"
    assert [u.origin for u in applied] == ["/prompt", "/guidance_scale"]


def test_a_bad_value_is_reported_and_the_node_keeps_going(engine_node: tuple[Node, list]) -> None:
    node, _ = engine_node
    applied: list[Update] = []
    failed: list[str] = []
    node.queue.on_report(lambda u, error: applied.append(u) if error is None else failed.append(error))
    node.queue.put(Update("guidance_scale", 99, "/guidance_scale"))
    node.queue.put(Update("nonsense", 1))
    wait_for(lambda: "nonsense" in node.status()["error"], what="the error in status")
    out = node.frames_out
    wait_for(lambda: node.frames_out > out + 3, what="more frames")
    assert applied == [] and node.status()["params"]["guidance_scale"] == 1.2
    assert len(failed) == 2 and "0..20" in failed[0] and "nonsense" in failed[1]
    node.queue.put(Update("guidance_scale", 2.0))
    wait_for(lambda: node.status()["params"]["guidance_scale"] == 2.0, what="a good value after a bad one")


def test_pause_holds_the_last_output_and_bypass_skips_the_engine(engine_node: tuple[Node, list]) -> None:
    node, engines = engine_node
    sink = CaptureSink.instances["capture://a"]
    node.queue.put(Update("pause", True))
    wait_for(lambda: node.status()["state"] == "paused", what="paused")
    time.sleep(0.1)
    count = node.frames_out
    time.sleep(0.3)
    assert node.frames_out == count and node.status()["pause"] is True
    node.queue.put(Update("pause", False))
    wait_for(lambda: node.frames_out > count + 2, what="resumed")

    engines[0].invert = True
    wait_for(lambda: sink.last is not None and sink.last[0, 0, 0] == 255 - 100, what="inverted output")
    node.queue.put(Update("bypass", True))
    wait_for(lambda: sink.last[0, 0, 0] == 100, what="the input passed through")
    assert node.status()["bypass"] is True and node.live().node.bypass is True


def test_preset_applies_its_live_values(engine_node: tuple[Node, list]) -> None:
    node, engines = engine_node
    node.queue.put(Update("preset", "demo"))
    demo = load_config(preset="demo").stream
    wait_for(lambda: node.live().node.preset == "demo", what="the preset in force")
    assert engines[0].live_params().params == demo.live  # every live value, exactly the preset's
    node.queue.put(Update("preset", "no-such-preset"))
    wait_for(lambda: "not found" in node.status()["error"], what="an unknown preset reported")
    assert node.live().node.preset == "demo"


def test_model_switch_is_refused_unless_allowed() -> None:
    node = Node(config())
    with node:
        wait_for(lambda: node.frames_out > 0, what="frames")
        node.queue.put(Update("model", "x"))
        wait_for(lambda: "allow-model-switch" in node.status()["error"], what="the refusal")


def test_a_vanished_source_holds_the_last_frame_then_black_then_resumes(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(**{"source.uri": "scripted://cam", "source.fps": 50, "source.hold_after_s": 0.2,
                    "source.lost_timeout_s": 0.8})
    node = Node(cfg)
    with node:
        sink = CaptureSink.instances["capture://a"]
        src = ScriptedSource.instances["scripted://cam"]
        wait_for(lambda: sink.last is not None and sink.last[0, 0, 0] == 100, what="first frames")
        src.mode = "lost"  # unplugged: read raises, open fails
        time.sleep(0.5)
        held = list(sink.frames)
        assert held[-1][1] == 100 and node.status()["source"]["holding"]
        rate_start = len(sink.frames)
        time.sleep(0.5)
        assert len(sink.frames) - rate_start >= 15  # still ~50 fps out of a dead source
        wait_for(lambda: sink.last[0, 0, 0] == 0, timeout=3, what="black after lost_timeout_s")
        src.mode, src.level = "frames", 180
        wait_for(lambda: sink.last[0, 0, 0] == 180, timeout=5, what="the source back")
        assert src.opens >= 2 and not node.status()["source"]["holding"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "scripted://cam" in r.getMessage()]
    assert len(warnings) <= 4, warnings  # one line per event, not one per retry


def test_a_failing_sink_never_stalls_the_others() -> None:
    node = Node(config(sinks=["capture://good", "capture://bad?fail=1000000", "capture://slow?delay=0.3"]))
    with node:
        good, bad, slow = (CaptureSink.instances[f"capture://{n}"] for n in
                           ("good", "bad?fail=1000000", "slow?delay=0.3"))
        time.sleep(1.2)
        assert len(good.frames) >= 50  # ~60 fps source, unaffected
        assert len(slow.frames) <= 5  # latest-wins mailbox: it skips what it cannot take
        assert bad.opens >= 2 and not bad.frames  # reopened with backoff, still failing
        st = {s["uri"]: s for s in node.status()["sinks"]}
        assert st["capture://bad?fail=1000000"]["errors"] >= 2 and st["capture://slow?delay=0.3"]["dropped"] > 20


def test_a_sink_that_recovers_is_used_again() -> None:
    node = Node(config(sinks=["capture://flaky?fail=3"]))
    with node:
        sink = CaptureSink.instances["capture://flaky?fail=3"]
        wait_for(lambda: len(sink.frames) > 5, timeout=8, what="frames after recovery")
        assert sink.opens >= 2


class DelayEngine(PassThroughEngine):
    """Like a stream batch of T=3: each output is the input of two calls before (the first are black)."""

    delay_calls = 2

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self._queue = [np.zeros((height, width, 3), np.uint8) for _ in range(self.delay_calls)]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self._queue.append(super().__call__(image).copy())
        return self._queue.pop(0)


def test_no_drop_keeps_every_frame_aligned_through_a_delaying_engine() -> None:
    cfg = config(**{"source.uri": "scripted://cam", "runtime.no_drop": True, "runtime.max_frames": 40,
                    "runtime.ring_slots": 2})
    engine = DelayEngine(SIZE, SIZE)
    levels = iter(range(1, 1000))

    class Counting(ScriptedSource):
        def read(self, timeout: float) -> np.ndarray:
            self._image[:] = next(levels)
            return self._image

    base.register_source("scripted", Counting)
    node = Node(cfg, engine_factory=lambda _: engine)
    assert node.run() == 0
    sink = CaptureSink.instances["capture://a"]
    assert [level for _, level in sink.frames] == list(range(1, 41))  # no black warm-up, none missing
    assert [seq for seq, _ in sink.frames] == list(range(1, 41))


def test_txt2img_mode_runs_without_a_source() -> None:
    node = Node(config(**{"stream.mode": "txt2img", "source.fps": 60, "runtime.max_frames": 10}))
    assert node.run() == 0
    assert len(CaptureSink.instances["capture://a"].frames) == 10 and node.frames_in == 0


def test_engine_that_cannot_load_stops_the_node_with_exit_1() -> None:
    def broken(_cfg):  # noqa: ANN001, ANN202
        raise RuntimeError("no such model")

    node = Node(config(), engine_factory=broken)
    assert node.run() == 1
    assert node.status()["state"] == "error" and "no such model" in node.status()["error"]


def test_engine_errors_on_some_frames_are_survived() -> None:
    class Flaky(PassThroughEngine):
        calls = 0

        def __call__(self, image: np.ndarray) -> np.ndarray:
            Flaky.calls += 1
            if Flaky.calls % 3 == 0:
                raise RuntimeError("CUDA hiccup")
            return super().__call__(image)

    node = Node(config(**{"runtime.max_frames": 20}), engine_factory=lambda c: Flaky(SIZE, SIZE))
    assert node.run() == 0
    assert node.frames_out == 20 and "CUDA hiccup" in node.status()["error"]


def test_bad_sink_uri_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="no sink for nope://"):
        Node(config(sinks=["nope://x"])).run()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_short_flags_map_onto_the_config() -> None:
    cfg = config_from_args(parse(
        "--preset", "demo", "--source", "ndi://Cam", "--sink", "null://", "--sink", "shm://x", "--fit", "contain",
        "--width", "128", "--height", "96", "--prompt", "p", "--no-drop", "--once", "--duration", "3",
        "--max-frames", "9", "--ndi-discovery", "10.0.0.5,127.0.0.1", "--engine", "passthrough", "--model", "m",
        "--accel", "eager", "--device", "cpu", "--osc-port", "0", "--osc-prefix", "/vj1",
        "--allow-model-switch", "--log-level", "debug", "--set", "stream.seed=7",
    ))
    assert cfg.source.uri == "ndi://Cam" and cfg.sinks == ["null://", "shm://x"] and cfg.source.fit == "contain"
    assert (cfg.stream.width, cfg.stream.height, cfg.stream.prompt, cfg.stream.seed) == (128, 96, "p", 7)
    assert cfg.runtime.no_drop and not cfg.source.loop and cfg.runtime.duration == 3 and cfg.runtime.max_frames == 9
    assert cfg.source.ndi_discovery == ["10.0.0.5", "127.0.0.1"] and cfg.runtime.engine == "passthrough"
    assert (cfg.model.id, cfg.model.accel, cfg.model.device) == ("m", "eager", "cpu")
    # The demo preset turns OSC off; asking for a port turns it on.
    assert cfg.osc.port == 0 and cfg.osc.prefix == "/vj1" and cfg.osc.enabled and cfg.osc.allow_model_switch
    assert cfg.runtime.log_level == "debug"
    assert config_from_args(parse("--preset", "demo")).sinks == load_config(preset="demo").sinks
    assert not config_from_args(parse("--preset", "demo")).osc.enabled
    assert config_from_args(parse("--preset", "demo", "--osc-host", "127.0.0.1")).osc.enabled
    assert not config_from_args(parse("--no-osc")).osc.enabled
    with pytest.raises(ConfigError, match="--no-osc with --osc-port"):
        config_from_args(parse("--no-osc", "--osc-port", "7000"))
    forever = config_from_args(parse("--preset", "demo", "--forever"))
    assert forever.runtime.duration is None and forever.runtime.max_frames is None


def test_run_command_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(parse("--width", "63")) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamnode run: config: stream.width = 63") and err.count("\n") == 1
    assert run_command(parse("--sink", "bogus://", "--no-osc", "--engine", "passthrough")) == 1
    assert "no sink for bogus://" in capsys.readouterr().err
    assert run_command(parse("--source", "test://bars?fps=120", "--sink", "null://", "--no-osc",
                             "--engine", "passthrough", "--width", "64", "--height", "64", "--max-frames", "5")) == 0
    assert "5 frames out" in capsys.readouterr().err


def test_osc_drives_the_node() -> None:
    from pythonosc.udp_client import SimpleUDPClient

    from streamnode.control import osc

    engines: list[RecordingEngine] = []

    def factory(cfg):  # noqa: ANN001, ANN202
        engines.append(RecordingEngine(cfg.stream.width, cfg.stream.height))
        return engines[-1]

    node = Node(config(**{"osc.enabled": True, "osc.port": 0}), engine_factory=factory)
    with node:
        assert isinstance(node._osc, osc.OscServer)
        client = SimpleUDPClient("127.0.0.1", node._osc.port)
        wait_for(lambda: node.frames_out > 0, what="frames")
        client.send_message("/prompt", "sent over OSC")
        wait_for(lambda: node.status()["params"]["prompt"] == "sent over OSC", what="the OSC prompt applied")
        assert {"prompt": "sent over OSC"} in engines[0].updates
    assert node._osc is None


def test_frame_buffer_size_batches_frames_per_call() -> None:
    calls: list[tuple[int, ...]] = []

    class Batched(PassThroughEngine):
        def __call__(self, image: np.ndarray) -> np.ndarray:
            calls.append(image.shape)
            return super().__call__(image)

    cfg = config(**{"stream.frame_buffer_size": 2, "runtime.no_drop": True, "runtime.max_frames": 10,
                    "source.uri": "test://moving"})
    node = Node(cfg, engine_factory=lambda c: Batched(SIZE, SIZE))
    assert node.run() == 0
    assert set(calls) == {(2, SIZE, SIZE, 3)}
    seqs = [seq for seq, _ in CaptureSink.instances["capture://a"].frames]
    assert seqs == list(range(1, 11))


def test_sources_command_lists_devices_without_touching_the_network(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from streamnode.commands.sources import add_sources_arguments, sources_command
    from streamnode.io import ndi, webcam

    seen: list[tuple] = []
    monkeypatch.setattr(ndi, "list_sources", lambda discovery, wait: seen.append((discovery, wait)) or ["HOST (Cam)"])
    monkeypatch.setattr(webcam, "list_devices", lambda: [("webcam://0", "Integrated Camera (/dev/video0)")])
    parser = argparse.ArgumentParser()
    add_sources_arguments(parser)
    assert sources_command(parser.parse_args(["--ndi-discovery", "127.0.0.1", "--wait", "0.1"])) == 0
    out = capsys.readouterr().out
    assert "ndi://HOST (Cam)" in out and "webcam://0  Integrated Camera" in out
    assert seen == [(("127.0.0.1",), 0.1)]


def test_live_frame_buffer_groups_are_spread_over_the_call_period() -> None:
    """F = 2 in live mode: both results of a call reach the sink, half a call period apart,
    instead of the second overwriting the first in the latest-wins mailbox."""
    calls: list[float] = []

    class SlowBatched(PassThroughEngine):
        def __call__(self, image: np.ndarray) -> np.ndarray:
            time.sleep(0.05)
            calls.append(time.monotonic())
            return super().__call__(image)

    cfg = config(**{"stream.frame_buffer_size": 2, "source.uri": "test://moving", "source.fps": 120})
    node = Node(cfg, engine_factory=lambda c: SlowBatched(SIZE, SIZE))
    arrivals: list[float] = []
    with node:
        sink = CaptureSink.instances["capture://a"]
        wait_for(lambda: len(calls) >= 3, what="engine calls")
        seen = len(sink.frames)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if len(sink.frames) != seen:
                seen = len(sink.frames)
                arrivals.append(time.monotonic())
            time.sleep(0.001)
        n_calls = sum(1 for t in calls if t >= deadline - 1.5)
    assert n_calls >= 10
    assert len(arrivals) >= 1.6 * n_calls, (len(arrivals), n_calls)  # ~both frames of every call
    gaps = sorted(b - a for a, b in zip(arrivals[:-1], arrivals[1:], strict=True))
    period = 1.5 / n_calls
    assert gaps[len(gaps) // 4] > 0.25 * period, (gaps[:5], period)  # spread out, not back to back


def test_txt2img_frame_buffer_groups_reach_the_sink_whole() -> None:
    class Pairs(PassThroughEngine):
        calls = 0

        def txt2img(self) -> np.ndarray:
            Pairs.calls += 1
            out = np.zeros((2, SIZE, SIZE, 3), np.uint8)
            out[0], out[1] = 10, 200  # first and second frame of every group
            return out

    cfg = config(**{"stream.mode": "txt2img", "stream.frame_buffer_size": 2, "source.fps": 10})
    node = Node(cfg, engine_factory=lambda c: Pairs(SIZE, SIZE))
    with node:
        sink = CaptureSink.instances["capture://a"]
        wait_for(lambda: Pairs.calls >= 10, timeout=10, what="ten txt2img calls")
    levels = [level for _, level in sink.frames]
    assert levels.count(10) >= 7 and levels.count(200) >= 7, levels  # both halves, not only the last
