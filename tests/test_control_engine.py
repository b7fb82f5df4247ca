"""OSC → the real node → the real StreamEngine (tiny model, 64×64, CPU), driven by three
independent senders: python-osc, `streamnode osc` (the CLI, in its own process) and liblo's
`oscsend` (another implementation of OSC altogether, where it is installed).

Among them the two show-stoppers of issue "One live-parameter schema": a prompt blend followed
by a model switch, and a brush prompt sent again after the brush was cleared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import Surface, applied_addr, small_config, tiny_factory, wait_for

from streamnode.control.osc import ADDRESSES
from streamnode.control.updates import ENGINE_KEYS, Update
from streamnode.frames import Frame
from streamnode.io import base
from streamnode.node import Node

ROOT = Path(__file__).resolve().parent.parent


class LastFrameSink(base.Transport):
    """Keeps the last frame and its seq (a test sink registered as lastframe://)."""

    instances: list[LastFrameSink] = []

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.pace_fps = None
        self.frames: list[tuple[int, np.ndarray]] = []
        LastFrameSink.instances.append(self)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: Any, options: Any) -> LastFrameSink:
        return cls(uri)

    def open(self) -> None:
        pass

    def send(self, frame: Frame) -> None:
        self.frames.append((frame.seq, frame.image.copy()))

    def close(self) -> None:
        pass


@pytest.fixture
def node(components, tiny_model_path) -> Iterator[tuple[Node, Surface]]:  # noqa: ANN001
    base.register_sink("lastframe", LastFrameSink)
    LastFrameSink.instances.clear()
    surface = Surface()
    cfg = small_config(**{"osc.enabled": True, "osc.port": 0, "osc.reply_port": surface.port,
                          "osc.allow_model_switch": True, "sinks": ["lastframe://"],
                          "source.uri": "test://bars?fps=30", "stream.prompt": "a dog"})
    running = Node(cfg, engine_factory=tiny_factory(components))
    running.start()
    surface.node = ("127.0.0.1", running.osc_port)
    wait_for(lambda: running.status()["state"] == "streaming" and running.frames_out > 2, 30, "streaming")
    yield running, surface
    running.stop()
    surface.close()
    base._SINKS.pop("lastframe", None)


def test_a_prompt_sent_over_osc_changes_the_next_output_frame(node) -> None:  # noqa: ANN001
    running, surface = node
    sink = LastFrameSink.instances[-1]
    wait_for(lambda: len(sink.frames) > 3, what="frames")
    still = sink.frames[-1][1]  # test://bars is a still picture: only the prompt moves the output
    applied_after: list[int] = []
    running.queue.on_report(lambda u, e: u.key == "prompt" and applied_after.append(running.frames_out))
    surface.send("/prompt", "roaring flames")  # a look the tiny model knows (docs/tiny-model.md)
    surface.wait_for(applied_addr("/prompt"))
    wait_for(lambda: len(sink.frames) > applied_after[0] + 1, what="the next frames")
    # Every frame out before the update is the old picture; the first one after it is new.
    before = [img for i, (_, img) in enumerate(sink.frames) if i < applied_after[0]]
    after = sink.frames[applied_after[0]][1]
    assert all(np.array_equal(img, still) for img in before[-3:])
    assert np.abs(after.astype(int) - still).mean() >= 10.0  # uint8 levels: visibly new


def test_every_engine_address_is_accepted_by_the_engine(node) -> None:  # noqa: ANN001
    running, surface = node
    for n in (0, 1):  # two brushes for /brush/order to order
        surface.send(f"/brush/{n}/rect", 0.5 * n, 0.0, 0.5, 0.5)
        surface.wait_for(applied_addr(f"/brush/{n}/rect"))
    sends = {
        "/prompt": ["a cat"], "/negative_prompt": ["blurry"], "/prompt_blend": ["a", 0.5, "b", 0.5],
        "/blend_method": ["slerp"], "/prompt_transition": [8], "/guidance": [1.5], "/delta": [0.5],
        "/strength": [0.4], "/t_index": [10, 30], "/seed": [3_000_000_000], "/seed_blend": [1, 0.5, 2, 0.5],
        "/similarity": [0.9], "/similarity_max_skip": [4], "/brush/order": [1, 0],
        "/feature_bank": [1], "/feature_bank_size": [2], "/feature_bank_interval": [2], "/feature_fusion": [0.5],
        "/feature_fusion_threshold": [0.9], "/smoothing": [0.5], "/smoothing_motion": [0],
    }
    assert set(sends) == {p.address for p in ADDRESSES if p.key in ENGINE_KEYS}
    failed: list[tuple[Update, str]] = []
    running.queue.on_report(lambda u, e: e is not None and failed.append((u, e)))
    for address, args in sends.items():
        surface.send(address, *args)
        surface.wait_for(applied_addr(address), where=lambda p, a=args: p == pytest.approx(a) if
                         not isinstance(a[0], str) else p[0] == a[0])
    assert failed == []
    params = running.engine.params
    assert params.t_index_list == (10, 30) and params.similarity_max_skip == 4
    assert params.seed_blend == ((1, 0.5), (2, 0.5)) and params.blend_method == "slerp"
    assert running.engine.regions.order == (1, 0)
    assert params.feature_bank and params.smoothing == 0.5 and not params.smoothing_motion
    frames = running.frames_out
    wait_for(lambda: running.frames_out > frames + 3, what="frames with every value applied")
    assert running.engine.feature_bank is not None and running.engine.feature_bank.filled >= 1


# -- the two show-stoppers, through three different senders ---------------------------------


def _python_osc(port: int, address: str, *args: Any) -> None:
    from pythonosc.udp_client import SimpleUDPClient

    SimpleUDPClient("127.0.0.1", port).send_message(address, list(args))


def _streamnode_osc(port: int, address: str, *args: Any) -> None:
    # Typed by hand: the CLI would read "0.5" as a float anyway, but a prompt that looks like a
    # number must stay a string.
    tags = "".join("s" if isinstance(a, str) else "f" if isinstance(a, float) else "i" for a in args)
    exe = str(Path(sys.executable).parent / "streamnode")  # the command a user types, from this install
    cmd = [exe, "osc", "--port", str(port), *(["--types", tags] if args else []), address, *(str(a) for a in args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr


def _oscsend(port: int, address: str, *args: Any) -> None:
    tags = "".join("s" if isinstance(a, str) else "f" if isinstance(a, float) else "i" for a in args)
    cmd = ["oscsend", "127.0.0.1", str(port), address, *([tags] if args else []), *(str(a) for a in args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr


SENDERS: dict[str, Callable[..., None]] = {"python-osc": _python_osc, "streamnode-osc": _streamnode_osc,
                                           "oscsend": _oscsend}


def sender(name: str) -> Callable[..., None]:
    if name == "oscsend" and shutil.which("oscsend") is None:
        pytest.skip("liblo's oscsend is not installed (Debian: liblo-tools; .ci/run installs it)")
    return SENDERS[name]


@pytest.mark.parametrize("name", list(SENDERS))
def test_a_model_switch_after_a_prompt_blend_keeps_the_blend_and_the_brushes(node, name, tiny_model_path) -> None:  # noqa: ANN001
    running, surface = node
    send = sender(name)
    port = running.osc_port
    send(port, "/prompt_blend", "a red fox", 0.5, "a blue bird", 0.5)
    surface.wait_for(applied_addr("/prompt_blend"))
    send(port, "/brush/0/rect", 0.0, 0.0, 0.5, 0.5)
    send(port, "/brush/1/circle", 0.5, 0.5, 0.25)
    surface.wait_for(applied_addr("/brush/1/circle"))
    send(port, "/brush/order", 1, 0)
    surface.wait_for(applied_addr("/brush/order"), where=lambda p: p == [1, 0])
    before = running.engine
    folder = str(tiny_model_path)  # the tiny model again, from its folder: a real load
    send(port, "/model", folder)
    assert surface.wait_for(applied_addr("/model"), timeout=60) == [folder]
    assert running.engine is not before and running.config.model.id == folder
    params = running.engine.params
    assert params.prompt_blend == (("a red fox", 0.5), ("a blue bird", 0.5)) and params.prompt is None
    assert running.engine.regions.order == (1, 0)
    assert running.engine.live_params().brushes[1].params.circle == (0.5, 0.5, 0.25)
    assert not [e for e in surface.errors(0.2) if "model" in e]


@pytest.mark.parametrize("name", list(SENDERS))
def test_a_brush_prompt_sent_again_after_clear_paints_again(node, name) -> None:  # noqa: ANN001
    running, surface = node
    send = sender(name)
    port = running.osc_port
    send(port, "/brush/0/prompt", "flames")
    surface.wait_for(applied_addr("/brush/0/prompt"), where=lambda p: p == ["flames"])
    send(port, "/brush/0/clear")
    surface.wait_for(applied_addr("/brush/0/clear"))
    assert 0 not in running.live().brushes
    send(port, "/brush/0/prompt", "flames")
    surface.wait_for(applied_addr("/brush/0/prompt"), where=lambda p: p == ["flames"])
    assert running.live().brushes[0].params.prompt == "flames"


def test_a_model_that_failed_can_be_asked_for_again(node, tmp_path) -> None:  # noqa: ANN001
    running, surface = node
    missing = str(tmp_path / "not-yet")
    surface.send("/model", missing)
    error = wait_for(lambda: next((e for e in surface.errors(0.1) if "not-yet" in e), None), 60, "the load error")
    assert "model" in error and running.config.model.id != missing
    frames = running.frames_out
    wait_for(lambda: running.frames_out > frames + 2, what="the old model still streaming")
    # The folder appears (the user copied it): the very same message now loads it.
    shutil.copytree(_tiny_folder(), tmp_path / "not-yet")
    surface.send("/model", missing)
    assert surface.wait_for(applied_addr("/model"), timeout=60) == [missing]
    assert running.config.model.id == missing


def _tiny_folder() -> Path:
    from streamnode.diffusion.tiny import ensure_tiny_model

    return ensure_tiny_model()


def test_osc_pause_status_and_errors_on_the_running_node(node) -> None:  # noqa: ANN001
    running, surface = node
    surface.send("/guidance", 2.5)
    assert surface.wait_for(applied_addr("/guidance")) == [2.5]
    assert running.engine.params.guidance_scale == 2.5
    surface.send("/pause", 1)
    assert surface.wait_for("/streamnode/state", where=lambda p: p == ["paused"])
    frames = running.frames_out
    time.sleep(0.3)
    assert running.frames_out == frames
    surface.send("/pause", 0)
    assert surface.wait_for("/streamnode/state", where=lambda p: p == ["streaming"])
    surface.send("/status")
    assert surface.wait_for(applied_addr("/prompt")) == ["a dog"]
    surface.send("/guidance", 99.0)
    assert "/guidance: 99.0 is out of range 0..20" in surface.errors(0.5)
    assert running.status()["state"] == "streaming"


def test_updates_that_arrive_together_apply_in_one_engine_update_each_reported(node) -> None:  # noqa: ANN001
    """A storm of faders costs one engine update a frame; a bad value among them is refused alone."""
    running, _surface = node
    engine = running.engine
    calls: list[set[str]] = []
    gate, entered = threading.Event(), threading.Event()
    update = engine.update

    def counted(**kwargs: Any) -> None:
        calls.append(set(kwargs))
        if "similarity_max_skip" in kwargs and not gate.is_set():
            entered.set()
            gate.wait(5)  # hold the engine thread between frames while the rest arrive
        update(**kwargs)

    reports: list[tuple[str, str | None]] = []
    running.queue.on_report(lambda u, error: reports.append((u.key, error)))
    engine.update = counted  # type: ignore[method-assign]
    try:
        running.queue.put(Update("similarity_max_skip", 7, origin="/similarity_max_skip"))
        assert entered.wait(5), "the engine thread did not take the first update"
        running.queue.put(Update("guidance_scale", 1.7, origin="/guidance"))
        running.queue.put(Update("delta", 0.6, origin="/delta"))
        running.queue.put(Update("t_index_list", [5, 3], origin="/t_index"))  # not increasing: refused
        calls.clear()
        gate.set()
        wait_for(lambda: {k for k, _ in reports} >= {"guidance_scale", "delta", "t_index_list"}, 10, "reports")
    finally:
        gate.set()
        engine.update = update  # type: ignore[method-assign]
    assert {"guidance_scale", "delta", "t_index_list"} in calls  # tried together first
    errors = dict(reports)
    assert errors["guidance_scale"] is None and errors["delta"] is None
    assert errors["t_index_list"]  # its own reason, reported against it alone
    params = running.live().params
    assert (params.guidance_scale, params.delta, params.similarity_max_skip) == (1.7, 0.6, 7)
    assert running.status()["state"] == "streaming"
