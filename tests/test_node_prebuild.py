"""A model switch to a model whose OpenVINO models are not cached yet: another process converts
and compiles them (node/prebuild.py) while the node streams on, then the node imports them.

Converting on the loader thread held the interpreter for up to ~200 ms at a time (a 1 s gap in
the output at 256²) and took several times as long; these run the real node, the real child
process and real OpenVINO.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Clock, clock_sinks, small_config, tiny_factory, wait_for

from streamnode.accel import describe_seams
from streamnode.accel.cache import BuildAbandoned
from streamnode.config import load_config
from streamnode.control.updates import Update
from streamnode.node import Node
from streamnode.node.prebuild import Prebuild, PrebuildFailed

pytest.importorskip("openvino", reason='OpenVINO is not installed: pip install "streamnode[openvino]"')


@pytest.fixture(autouse=True)
def clock_sink() -> Iterator[None]:
    with clock_sinks():
        yield


def prebuild_children() -> list[int]:
    """This process's children running the prebuild program."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"streamnode.node.prebuild" in cmdline:
            found.append(int(pid))
    return found


@pytest.fixture
def uncached_model(tiny_model_path: Path, tmp_path: Path) -> str:
    """The tiny model under another path: another identity, so none of its engines is cached."""
    copy = tmp_path / f"tiny-copy-{time.monotonic_ns()}"
    shutil.copytree(tiny_model_path, copy)
    return str(copy)


def openvino_node(components: Any) -> Node:
    config = small_config(**{"sinks": ["clock://"], "osc.allow_model_switch": True, "model.accel": "openvino"})
    return Node(config, engine_factory=tiny_factory(components))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the child process in /proc")
def test_a_switch_to_an_uncached_model_builds_it_in_another_process_and_streams_on(
        components, uncached_model, caplog) -> None:  # noqa: ANN001
    node = openvino_node(components)
    node.start()
    try:
        sink = Clock.instances[-1]
        wait_for(lambda: node.status()["state"] == "streaming" and len(sink.times) > 10, 120, "streaming")
        t_request, earlier = time.monotonic(), len(caplog.records)
        with caplog.at_level(logging.INFO, logger="streamnode"):
            node.queue.put(Update("model", uncached_model, origin="test"))
            wait_for(prebuild_children, 30, "the build process")
            wait_for(lambda: node.config.model.id == uncached_model, 180, "the switch")
        t_swap = time.monotonic()
        wait_for(lambda: len([t for t in sink.times if t > t_swap]) > 5, 10, "frames after the switch")
        seams = describe_seams(node.engine)
        # A shape the child never built (two steps): compiled here from the converted model the
        # child kept (accel/openvino_ir.py), not traced beside the serving engine.
        with caplog.at_level(logging.INFO, logger="streamnode"):
            node.queue.put(Update("t_index_list", [20, 35], origin="test"))
            wait_for(lambda: "unet for 2x4x8x8 2 2x77x64 compiled" in caplog.text, 60, "the new shape compiled")
    finally:
        node.stop()
    log = caplog.text
    assert "building its accelerated models in another process" in log
    assert "prebuild: streamnode.accel.openvino: openvino: converted unet" in log  # the child's own log, relayed
    assert "unet for 1x4x8x8 1 1x77x64 loaded from the cache" in log  # and this process imported it
    converted_here = [r.getMessage() for r in caplog.records[earlier:]
                      if r.name == "streamnode.accel.openvino" and "converted" in r.getMessage()]
    assert not converted_here
    assert all(seam["backend"] == "openvino" for seam in seams.values()), seams
    window = [t for t in sink.times if t_request <= t <= t_swap]
    assert t_swap - t_request > 2.0 and len(window) > 20  # the old model served meanwhile
    # No frozen picture while the child works (benchmarks/model_switch.py --uncached measures the gap).
    assert max(b - a for a, b in zip(window, window[1:], strict=False)) < 0.5
    assert not prebuild_children()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the child process in /proc")
def test_the_build_process_ends_with_the_node(components, uncached_model) -> None:  # noqa: ANN001
    node = openvino_node(components)
    node.start()
    try:
        wait_for(lambda: node.status()["state"] == "streaming", 120, "streaming")
        node.queue.put(Update("model", uncached_model, origin="test"))
        wait_for(prebuild_children, 30, "the build process")
    finally:
        node.stop()
    wait_for(lambda: not prebuild_children(), 5, "the build process gone")


def test_a_build_process_that_fails_says_why(tmp_path: Path) -> None:
    config = load_config(overrides={"model.id": str(tmp_path / "no-such-model"), "model.accel": "openvino"})
    prebuild = Prebuild(config, abandoned=lambda: False)
    with pytest.raises(PrebuildFailed, match="exited with 1: .*no-such-model"):
        prebuild()
    with pytest.raises(PrebuildFailed):  # once: a second miss of the same load does not start it again
        prebuild()


def test_an_abandoned_build_stops_its_process(tiny_model_path: Path) -> None:
    config = load_config(overrides={"model.id": str(tiny_model_path), "model.accel": "openvino"})
    started = time.monotonic()
    with pytest.raises(BuildAbandoned):
        Prebuild(config, abandoned=lambda: time.monotonic() - started > 1.0)()  # a newer request came
    assert time.monotonic() - started < 5.0
    assert not prebuild_children()
