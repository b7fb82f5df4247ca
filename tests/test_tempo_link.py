"""Ableton Link, for real, inside a loopback-only network namespace: the node (pass-through
engine) joins a Link session with `tempo.source = "link"`, a second peer joins, proposes a
tempo the node follows, then leaves; each is logged once and the node keeps streaming.
Nothing here can reach beyond 127.0.0.1: the scenario runs under `unshare -n`, started by this
file as a script (like tests/test_control_mdns.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
from netns import MULTICAST, netns_problem, run_scenario

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


@pytest.mark.netns
def test_a_link_peer_joining_setting_the_tempo_and_leaving_never_stops_the_node() -> None:
    pytest.importorskip("link", reason="pip install 'streamnode[tempo]'")
    problem = netns_problem()
    if problem:
        pytest.skip(problem)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    r = run_scenario(HERE, "scenario", setup=MULTICAST, timeout=60, env={"PYTHONPATH": pythonpath})
    assert r["peer_seen"], "the node saw the peer join"
    assert abs(r["node_bpm"] - 133.0) < 0.01, "the node follows the tempo the peer set"
    assert abs(r["beat_gap"]) < 0.05, "both peers agree on the beat"
    assert r["joined_lines"] == 1 and r["left_lines"] == 1, r["log"]
    assert r["frames_after_leave"] > 3 and r["state"] == "streaming", "the node plays on alone"
    assert r["beats_after_leave"] > 0.5, "its clock runs on at the last tempo"


def scenario() -> dict:
    import link

    from streamnode.config import load_config
    from streamnode.node import Node

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("streamnode.tempo.link").addHandler(Keep())
    logging.getLogger("streamnode.tempo.link").setLevel(logging.INFO)
    config = load_config(overrides={
        "source.uri": "test://moving?fps=30", "sinks": ["null://"], "stream.width": 64, "stream.height": 64,
        "runtime.engine": "passthrough", "osc.enabled": False, "tempo.source": "link", "tempo.bpm": 120.0,
    })
    node = Node(config)
    node.start()
    out: dict = {}
    try:
        peer = link.Link(120.0)
        peer.enabled = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and node.tempo.clock.peers == 0:  # type: ignore[attr-defined]
            time.sleep(0.05)
        out["peer_seen"] = node.tempo.clock.peers > 0  # type: ignore[attr-defined]
        state = peer.captureAppSessionState()
        state.setTempo(133.0, peer.clock().micros())
        peer.commitAppSessionState(state)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and abs(node.tempo.position().bpm - 133.0) > 0.01:
            time.sleep(0.05)
        out["node_bpm"] = node.tempo.position().bpm
        now = time.monotonic()
        theirs = peer.captureAppSessionState().beatAtTime(peer.clock().micros(), 4.0)
        out["beat_gap"] = node.tempo.position(now).beat - theirs
        peer.enabled = False  # the peer leaves
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("left" in r for r in records):
            time.sleep(0.05)
        frames, beat = node.frames_out, node.tempo.position().beat
        time.sleep(0.5)
        out["frames_after_leave"] = node.frames_out - frames
        out["beats_after_leave"] = node.tempo.position().beat - beat
        out["state"] = node.status()["state"]
    finally:
        node.stop()
    out["joined_lines"] = sum("joined" in r for r in records)
    out["left_lines"] = sum("left" in r for r in records)
    out["log"] = records
    return out


if __name__ == "__main__" and sys.argv[1:] == ["scenario"]:
    print(json.dumps(scenario()))
