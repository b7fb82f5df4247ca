"""ndi://: for real, inside a loopback-only network namespace.

A test sender → `streamnode run --source ndi://… --sink ndi://…` → a test receiver. The sender
is killed mid-stream and brought back: the node keeps outputting (the held frame) and then
follows the new sender. Nothing here can reach beyond 127.0.0.1: the whole scenario runs under
`unshare -n` (a new network namespace with only `lo`), started by this file as a script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from netns import netns_problem, run_scenario

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


def _run_in_netns(*args: str, timeout: float = 90) -> dict:
    pytest.importorskip("NDIlib", reason='ndi-python not installed (pip install "streamnode[ndi]")')
    reason = netns_problem()
    if reason:
        pytest.skip(reason)
    return run_scenario(HERE, *args, timeout=timeout)


@pytest.mark.netns
@pytest.mark.slow
def test_ndi_in_and_out_survives_the_sender_going_away() -> None:
    # Unique names: NDI senders clash by name across namespaces on one host.
    r = _run_in_netns("scenario", uuid.uuid4().hex[:8])
    assert r["isolated"], "the namespace must have only loopback"
    # `streamnode sources` saw the test sender over loopback discovery.
    assert any(name.endswith(f"({r['names'][0]})") for name in r["sources"]), r["sources"]
    a, gap, b = r["phase_a"], r["gap"], r["phase_b"]
    # NDI is lossy on a busy machine: most, not all, frames arrive.
    assert a["frames"] >= 0.6 * a["expected"], a
    assert a["red"] >= 0.9 * a["frames"], a
    # The sender is gone: the node keeps sending its last (red) frame.
    assert gap["frames"] >= 0.5 * gap["expected"], gap
    assert gap["red"] >= 0.9 * gap["frames"], gap
    # The sender is back (green now): the node found it again.
    assert b["green"] >= 10, b
    assert r["node_rc"] == 0 and r["exit_s"] < 3.0, r


# -- the scenario, run inside the namespace ---------------------------------------------------

SENDER = """
import sys, time
import numpy as np
import NDIlib as ndi
name, colour = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
assert ndi.initialize()
settings = ndi.SendCreate(); settings.ndi_name = name; settings.clock_video = False
sender = ndi.send_create(settings)
frame = np.zeros((48, 64, 4), np.uint8); frame[:] = colour + [255]
video = ndi.VideoFrameV2(); video.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
video.frame_rate_N, video.frame_rate_D = 30, 1
video.data = frame
print("sending", flush=True)
while True:
    ndi.send_send_video_v2(sender, video)
    time.sleep(1 / 30)
"""


def _find(ndi, suffix: str, timeout: float):  # noqa: ANN001, ANN202
    """Look for a sender; a fresh finder each try (one finder reaches one NDI process over loopback)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settings = ndi.FindCreate()
        settings.extra_ips = "127.0.0.1"
        finder = ndi.find_create_v2(settings)
        try:
            ndi.find_wait_for_sources(finder, 700)
            found = next((s for s in ndi.find_get_current_sources(finder) if s.ndi_name.endswith(suffix)), None)
            if found is not None:
                source = ndi.Source()
                source.ndi_name, source.url_address = found.ndi_name, found.url_address
                return source
        finally:
            ndi.find_destroy(finder)
    raise AssertionError(f"no NDI sender named *{suffix} within {timeout} s")


def _scenario(tag: str) -> dict:
    import NDIlib as ndi

    from streamnode.commands.sources import list_all_sources

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    isolated = all(" lo " in line for line in addrs.splitlines())
    logs = open(os.environ.get("SN_NDI_LOG", os.devnull), "w")  # noqa: SIM115
    children: list[subprocess.Popen] = []
    name_in, name_out = f"sn-in-{tag}", f"sn-out-{tag}"

    def start_sender(colour: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", SENDER, name_in, colour], env=env,
                                stdout=subprocess.PIPE, stderr=logs, text=True)
        children.append(proc)
        assert proc.stdout.readline().strip() == "sending"
        return proc

    try:
        sender = start_sender("220,20,20")
        sources = [u.removeprefix("ndi://") for u in list_all_sources(("127.0.0.1",), wait_s=1.5)["ndi"]]
        node = subprocess.Popen(
            [sys.executable, "-m", "streamnode.cli", "run", "--source", f"ndi://{name_in}",
             "--sink", f"ndi://{name_out}", "--engine", "passthrough", "--width", "64", "--height", "64",
             "--ndi-discovery", "127.0.0.1", "--no-osc", "--set", "source.hold_after_s=0.3",
             "--set", "source.lost_timeout_s=60", "--set", "source.fps=30", "--log-level", "debug"],
            env=env, stdout=logs, stderr=logs,
        )
        children.append(node)
        assert ndi.initialize()
        recv_settings = ndi.RecvCreateV3()
        recv_settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
        receiver = ndi.recv_create_v3(recv_settings)
        ndi.recv_connect(receiver, _find(ndi, f"({name_out})", timeout=20))

        def watch(seconds: float) -> dict:
            counts = {"frames": 0, "red": 0, "green": 0, "expected": round(seconds * 30)}
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                kind, video, _, _ = ndi.recv_capture_v2(receiver, 100, want_audio=False, want_metadata=False)
                if kind == ndi.FRAME_TYPE_VIDEO:
                    r, g = (int(v) for v in video.data[8:-8, 8:-8, :2].reshape(-1, 2).mean(axis=0))
                    ndi.recv_free_video_v2(receiver, video)
                    counts["frames"] += 1
                    counts["red"] += r > 150 and g < 80
                    counts["green"] += g > 150 and r < 80
            return counts

        # Wait for the node to find the sender, then measure.
        deadline = time.monotonic() + 20
        while watch(0.5)["red"] == 0 and time.monotonic() < deadline:
            pass
        phase_a = watch(2.0)
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        gap = watch(2.5)
        sender = start_sender("20,220,20")
        phase_b = {"frames": 0, "red": 0, "green": 0}
        deadline = time.monotonic() + 25
        while phase_b["green"] < 10 and time.monotonic() < deadline:
            for k, v in watch(0.5).items():
                if k != "expected":
                    phase_b[k] += v
        t0 = time.monotonic()
        node.send_signal(signal.SIGTERM)
        node_rc = node.wait(10)
        exit_s = time.monotonic() - t0
        ndi.recv_destroy(receiver)
        return {"isolated": isolated, "names": [name_in, name_out], "sources": sources, "phase_a": phase_a, "gap": gap, "phase_b": phase_b,
                "node_rc": node_rc, "exit_s": round(exit_s, 2)}
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["scenario"]:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_scenario(sys.argv[2])), flush=True)
