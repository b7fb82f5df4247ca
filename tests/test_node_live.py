"""The node on the real engine (the tiny model): its live state has one owner, and a model switch
never freezes the picture.

- The node replays the engine's own snapshot onto a new engine: parameters, the prompt blend,
  brushes and their order, whatever changed while the new model loaded.
- The new model loads off the engine thread while the old one keeps serving frames; the swap
  happens between two frames; the engine that loses is closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import Clock, clock_sinks, small_config, tiny_factory, wait_for

from streamnode.control.updates import Update
from streamnode.node import Node


@pytest.fixture(autouse=True)
def clock_sink() -> Iterator[None]:
    with clock_sinks():
        yield


class SlowLoads:
    """The node's engine factory, taking `seconds` longer for every engine after the first;
    records the engines it built and whether each was closed."""

    def __init__(self, components: Any, seconds: float, wait: Callable[[float], None] = time.sleep,
                 close_seconds: float = 0.0) -> None:
        self.build = tiny_factory(components)
        self.seconds = seconds
        self.wait = wait
        self.close_seconds = close_seconds  # how long each close takes (an accelerated engine's teardown)
        self.engines: list[Any] = []
        self.closed: list[Any] = []
        self.closed_on: list[str] = []  # the thread each close ran on
        self.load_started = threading.Event()

    def __call__(self, config: Any) -> Any:
        if self.engines:
            self.load_started.set()
            self.wait(self.seconds)
        engine = self.build(config)
        close = engine.close

        def recording_close() -> None:
            self.closed_on.append(threading.current_thread().name)
            time.sleep(self.close_seconds)
            self.closed.append(engine)
            close()

        engine.close = recording_close
        self.engines.append(engine)
        return engine


def test_frames_keep_flowing_while_a_new_model_loads(components, tiny_model_path) -> None:  # noqa: ANN001
    factory = SlowLoads(components, seconds=2.0)
    node = Node(small_config(**{"sinks": ["clock://"], "osc.allow_model_switch": True,
                                "stream.t_index_list": [32, 45]}), engine_factory=factory)
    node.start()
    try:
        sink = Clock.instances[-1]
        wait_for(lambda: node.status()["state"] == "streaming" and len(sink.times) > 10, 30, "streaming")
        calls_before = node.status()["engine_ms"]
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        assert factory.load_started.wait(10)
        t_load = time.monotonic()
        wait_for(lambda: node.config.model.id == str(tiny_model_path), 30, "the switch")
        t_swap = time.monotonic()
        wait_for(lambda: len([t for t in sink.times if t > t_swap]) > 5, 10, "frames after the switch")
        closed_by_the_switch = list(factory.closed)
    finally:
        node.stop()
    during = [t for t in sink.times if t_load <= t <= t_swap]
    assert t_swap - t_load >= 2.0 and len(during) > 10  # the old model served the load's seconds
    window = [t for t in sink.times if t >= t_load - 0.5]
    gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
    # No frozen picture: no gap near the load of even a fraction of it (frames come every ~33 ms).
    assert max(gaps) < 0.5, (max(gaps), calls_before)
    old, new = factory.engines
    assert closed_by_the_switch == [old]  # the loser closed at the swap, the winner serving
    assert factory.closed == [old, new]  # and the winner when the node stopped
    assert node.status()["loading_model"] is None


def test_the_replaced_engine_is_closed_off_the_engine_thread_while_frames_go_on(components, tiny_model_path) -> None:  # noqa: ANN001
    """Closing an accelerated engine takes time (an OpenVINO UNet's teardown: 27-33 ms here, a
    TensorRT engine's more): the engine thread hands the loser to the loader and streams on."""
    factory = SlowLoads(components, seconds=0.0, close_seconds=1.5)
    node = Node(small_config(**{"sinks": ["clock://"], "osc.allow_model_switch": True}), engine_factory=factory)
    node.start()
    try:
        sink = Clock.instances[-1]
        wait_for(lambda: node.status()["state"] == "streaming" and len(sink.times) > 10, 30, "streaming")
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        wait_for(lambda: node.config.model.id == str(tiny_model_path), 30, "the switch")
        t_swap = time.monotonic()
        wait_for(lambda: len(factory.closed) == 1, 10, "the old engine closed")
        t_closed = time.monotonic()
        old, new = factory.engines
    finally:
        node.stop()
    assert factory.closed_on[0] == "model-loader" and factory.closed[0] is old
    during = [t for t in sink.times if t_swap - 0.2 <= t <= t_closed]
    assert t_closed - t_swap >= 1.0 and len(during) > 10  # the new engine served while the old one closed
    assert max(b - a for a, b in zip(during, during[1:], strict=False)) < 0.5
    assert factory.closed == [old, new]  # the winner closed when the node stopped


def busy(seconds: float) -> None:
    """Keep the interpreter busy for `seconds`, as building modules and reading configs does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(200))


def test_a_load_busy_in_python_leaves_the_engine_its_frames(components, tiny_model_path) -> None:  # noqa: ANN001
    """The interpreter is shared: a loader that never lets go of it (a 5 ms switch interval per
    engine op) cut the output to a trickle; the loader yields it, so frames keep their pace."""
    factory = SlowLoads(components, seconds=2.0, wait=busy)
    node = Node(small_config(**{"sinks": ["clock://"], "osc.allow_model_switch": True,
                                "source.uri": "test://bars?fps=200"}), engine_factory=factory)
    node.start()
    try:
        sink = Clock.instances[-1]
        wait_for(lambda: node.status()["state"] == "streaming" and len(sink.times) > 10, 30, "streaming")
        time.sleep(1.0)
        t_before = time.monotonic()
        time.sleep(1.5)
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        assert factory.load_started.wait(10)
        t_load = time.monotonic()
        wait_for(lambda: node.config.model.id == str(tiny_model_path), 30, "the switch")
        t_swap = time.monotonic()
    finally:
        node.stop()
    rate_before = len([t for t in sink.times if t_before <= t < t_before + 1.5]) / 1.5
    busy_end = t_load + 2.0
    rate_during = len([t for t in sink.times if t_load <= t < busy_end]) / 2.0
    assert t_swap >= busy_end
    assert rate_during >= 0.5 * rate_before, (rate_during, rate_before)


def test_the_snapshot_in_force_reaches_the_new_engine_including_changes_during_the_load(
        components, tiny_model_path) -> None:  # noqa: ANN001
    factory = SlowLoads(components, seconds=1.0)
    node = Node(small_config(**{"osc.allow_model_switch": True}), engine_factory=factory)
    node.start()
    try:
        wait_for(lambda: node.status()["state"] == "streaming", 30, "streaming")
        for update in [Update("prompt_blend", [("a red fox", 0.5), ("a blue bird", 0.5)]),
                       Update("seed", 7), Update("strength", 0.5),
                       Update("brush", (0, "rect", (0.0, 0.0, 0.5, 0.5))),
                       Update("brush", (1, "circle", (0.5, 0.5, 0.25))),
                       Update("brush_order", [1, 0])]:
            node.queue.put(update)
        wait_for(lambda: node.live().brush_order == (1, 0), what="the edits applied")
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        assert factory.load_started.wait(10)
        # While it loads: more changes, which the new engine must catch up with.
        node.queue.put(Update("guidance_scale", 3.0))
        node.queue.put(Update("brush", (0, "prompt", "flames")))
        node.queue.put(Update("brush", (1, "clear", None)))
        wait_for(lambda: node.config.model.id == str(tiny_model_path), 30, "the switch")
    finally:
        node.stop()
    old, new = factory.engines
    assert node.live().params == old.live_params().params  # the live state carried over whole
    p = new.live_params().params
    assert p.prompt_blend == (("a red fox", 0.5), ("a blue bird", 0.5)) and p.prompt is None
    assert (p.seed, p.strength, p.guidance_scale) == (7, 0.5, 3.0) and p.t_index_list == (25,)
    brushes = new.live_params().brushes
    assert set(brushes) == {0} and brushes[0].params.prompt == "flames"
    assert brushes[0].params.rect == (0.0, 0.0, 0.5, 0.5)


def test_a_failed_load_keeps_the_old_engine_and_says_why(components, tmp_path) -> None:  # noqa: ANN001
    factory = SlowLoads(components, seconds=0.0)
    node = Node(small_config(**{"osc.allow_model_switch": True}), engine_factory=factory)
    reports: list[tuple[Update, str | None]] = []
    node.queue.on_report(lambda u, e: reports.append((u, e)))
    node.start()
    try:
        wait_for(lambda: node.status()["state"] == "streaming", 30, "streaming")
        node.queue.put(Update("model", str(tmp_path / "nothing-here"), origin="test"))
        wait_for(lambda: any(u.key == "model" for u, _ in reports), 30, "the load reported")
        frames = node.frames_out
        wait_for(lambda: node.frames_out > frames + 3, what="the old engine streaming")
    finally:
        node.stop()
    (update, error), = [(u, e) for u, e in reports if u.key == "model"]
    assert error is not None and "nothing-here" in error and "no such file" in error
    assert node.config.model.id == "tiny" and len(factory.engines) == 1
    assert "nothing-here" in node.status()["error"]


def test_a_preset_replaces_the_look_brushes_included(components) -> None:  # noqa: ANN001
    node = Node(small_config(), engine_factory=tiny_factory(components))
    node.start()
    try:
        wait_for(lambda: node.status()["state"] == "streaming", 30, "streaming")
        node.queue.put(Update("brush", (5, "rect", (0.0, 0.0, 1.0, 1.0))))
        node.queue.put(Update("preset", "brushes-demo"))
        wait_for(lambda: node.live().node.preset == "brushes-demo", what="the preset in force")
        live = node.live()
        assert live.brush_order == (0, 1, 2) and live.brushes[0].params.prompt == "roaring flames"
        assert node.engine.regions.active == (0, 1, 2)
        node.queue.put(Update("preset", "demo"))  # a preset without brushes: none stay
        wait_for(lambda: node.live().node.preset == "demo", what="the second preset")
        assert node.live().brush_order == () and node.engine.layers == 1
    finally:
        node.stop()


def test_a_switched_out_model_is_freed_at_once_and_no_full_collection_walks_the_heap(tiny_model_path) -> None:  # noqa: ANN001
    """A node that owns its process (`streamnode run`) freezes its heap once streaming: a full
    garbage collection there took 190-270 ms and stopped the picture during a switch. Frozen
    objects are freed only by their reference counts, so the engine a switch replaces must
    not sit in a cycle: with the collector off, its model is gone right after the swap."""
    import gc
    import weakref

    node = Node(small_config(**{"sinks": ["clock://"], "osc.allow_model_switch": True,
                                "model.id": str(tiny_model_path)}), freeze_heap=True)
    node.start()
    try:
        sink = Clock.instances[-1]
        wait_for(lambda: node.status()["state"] == "streaming" and len(sink.times) > 3, 60, "streaming")
        assert gc.get_freeze_count() > 100_000, "the start-up heap is frozen"
        gc.disable()  # from here only reference counts free anything
        old = node.engine
        assert old is not None
        old_engine, old_unet = weakref.ref(old), weakref.ref(old.components.unet)
        del old
        node.queue.put(Update("model", str(tiny_model_path), origin="test"))
        wait_for(lambda: node.engine is not None and node.engine is not old_engine(), 60, "the switch")
        # The old engine lets go of its model in close(), and the engine thread of the engine right after.
        wait_for(lambda: old_unet() is None and old_engine() is None, 5, "the old model freed")
        assert len(gc.get_objects()) < gc.get_freeze_count() // 10, "a full pass walks little: the new model"
        wait_for(lambda: len([t for t in sink.times if t > time.monotonic() - 1.0]) > 3, 10, "frames after the switch")
    finally:
        node.stop()
        gc.unfreeze()  # this process is pytest's: its collector goes back to normal
        gc.enable()
