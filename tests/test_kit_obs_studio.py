"""The OBS kit inside a real OBS Studio (Debian's 29.x: obs-websocket 5.1, Python built in).

OBS runs under Xvfb with a throwaway home: a websocket password, three scenes (Live, BRB,
Interview) and `obs/streamnode_obs.py` loaded by the scene collection (`modules` →
`scripts-tool`), as OBS itself saves a loaded script. Two nodes run `streamnode run
--engine passthrough`: S for the script, W for the watchdog. The test plays the operator
over obs-websocket, the way a Stream Deck would.

- The script sends the panel's values when node S appears (preset first), cuts to BRB when
  S dies and back to Live when it returns; all its lines are info, so OBS's Script Log window
  never pops up.
- `streamnode_watchdog.py` starts before OBS (one line: nothing answers), cuts to BRB when W
  dies; the operator picks Interview during the outage and keeps it through the recovery; the
  next outage cuts again and the recovery returns to Interview.
- A watchdog with a scene OBS lacks says once which scenes exist; one with a wrong password
  says once that OBS refused it. No tracebacks, no floods.

obs-websocket 5.1 listens on all addresses, so everything runs inside a loopback-only
network namespace (`unshare -n`), started by this file as a script, like tests/test_io_ndi.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import pytest
from netns import netns_problem, run_scenario

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
SCRIPT = ROOT / "obs" / "streamnode_obs.py"
WATCHDOG = ROOT / "obs" / "streamnode_watchdog.py"

PANEL = {"prompt": "a paper lantern festival", "guidance": 2.0, "preset": "demo"}
# What the node then has in force: the panel's values over the preset's. The preset's one step
# (demo: [35]) at the panel's strength 0.5 is index 25; a node started without the preset would
# have two (its default [32, 45]). Once other values change, the node no longer reports the
# preset as in force.
IN_FORCE = {"prompt": "a paper lantern festival", "guidance": 2.0, "t_index": 25}
"""The script's panel in the scene collection; demo's own prompt and guidance differ."""
SCENES = ("Live", "BRB", "Interview")
OBS_PORT = 4455
NODE_S, NODE_W = (7000, 7001), (7100, 7101)  # (OSC port, reply port)


def _missing() -> str | None:
    """Why this machine cannot run the test, or None."""
    if not sys.platform.startswith("linux"):
        return "runs OBS under Xvfb in a network namespace: Linux only"
    for program, package in (("obs", "obs-studio"), ("Xvfb", "xvfb"), ("xwininfo", "x11-utils"),
                             ("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(program) is None:
            return f"{program} not found (Debian: apt-get install {package}; .ci/run installs it)"
    if importlib.util.find_spec("obsws_python") is None:
        return 'obsws-python not installed (pip install "streamnode[obs]")'
    return netns_problem()


@pytest.mark.netns
@pytest.mark.slow
def test_the_kit_in_a_real_obs() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    r = run_scenario(HERE, "scenario", timeout=150)
    context = json.dumps(r, indent=1)[-12000:]
    assert r["isolated"], "the namespace must have only loopback"

    # The script, inside OBS: loaded once, talking to node S, the panel's values applied over the preset.
    script_lines = r["script_log"]
    assert r["script_loaded"], context
    assert sum("sending to 127.0.0.1:7000, replies on port 7001" in line for line in script_lines) == 1, context
    assert r["values_at_start"] == IN_FORCE, context
    assert r["script_cut_s"] is not None and r["script_back_s"] is not None, context
    assert r["values_after_restart"] == IN_FORCE, context
    assert sum("switched OBS to the fallback scene 'BRB'" in line for line in script_lines) == 1, context
    assert sum("switched OBS back to scene 'Live'" in line for line in script_lines) == 1, context
    assert sum("node silent" in line for line in script_lines) == 1, context
    # OBS 29 pops its Script Log window up over everything for a warning: none may come.
    assert r["obs_window_seen"] and r["script_log_window"] is False and r["script_warnings"] == [], context

    # The watchdog: waited for OBS quietly, gave way to the operator, cut again next time.
    wd = r["watchdog"]
    assert sum("nothing answers at 127.0.0.1:4455" in line for line in wd) == 1, context
    assert any("fallback scene 'BRB' is ready" in line for line in wd), context
    assert r["wd_cut_s"] is not None and r["wd_cut_s"] < 8, context
    assert set(r["held_during_outage"]) == {"Interview"}, context
    assert set(r["held_after_recovery"]) == {"Interview"}, context
    assert r["wd_second_cut_s"] is not None and r["wd_back_to_operator_s"] is not None, context
    assert sum("switched OBS to the fallback scene 'BRB'" in line for line in wd) == 2, context
    assert sum("switched OBS back to scene 'Interview'" in line for line in wd) == 1, context
    assert sum("node silent" in line for line in wd) == 2, context  # one line per outage

    # Misconfigured watchdogs: one line each, naming the fix; no traceback, no flood.
    missing = r["missing_scene_watchdog"]
    about = [line for line in missing if "'Be right back'" in line and "watching" not in line]
    assert len(about) == 1 and "its scenes: 'Live', 'BRB', 'Interview'" in about[0], context
    assert not any("not reachable" in line or "nothing answers" in line for line in missing), context
    wrong = r["wrong_password_watchdog"]
    assert r["wrong_password_tries"] >= 2, context  # OBS refused it at least twice
    refused = [line for line in wrong if "refused the password in $OBS_WEBSOCKET_PASSWORD" in line]
    assert len(refused) == 1, context
    for log in (wd, missing, wrong):
        assert not any("Traceback" in line for line in log) and len(log) < 20, context


# -- the scenario, run inside the namespace ---------------------------------------------------


def _scene_source(name: str, n: int) -> dict[str, Any]:
    return {"id": "scene", "versioned_id": "scene", "name": name, "uuid": f"00000000-0000-4000-8000-{n:012d}",
            "settings": {"items": [], "id_counter": 0, "custom_size": False}}


def _obs_home(home: Path, password: str) -> None:
    """What OBS would have after a first run: profile, scene collection, websocket settings."""
    config = home / ".config" / "obs-studio"
    (config / "basic" / "scenes").mkdir(parents=True)
    (config / "basic" / "profiles" / "streamnode-test").mkdir(parents=True)
    (config / "global.ini").write_text(
        "[General]\nFirstRun=true\n\n"
        "[Basic]\nProfile=streamnode-test\nProfileDir=streamnode-test\n"
        "SceneCollection=streamnode-test\nSceneCollectionFile=streamnode-test\n\n"
        f"[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\nServerPort={OBS_PORT}\nAlertsEnabled=false\n"
        f"AuthRequired=true\nServerPassword={password}\n", encoding="utf-8")
    settings = {**PANEL, "resend_on_restart": True, "fallback_enabled": True, "fallback_scene": "BRB"}
    collection = {
        "name": "streamnode-test", "current_scene": "Live", "current_program_scene": "Live",
        "scene_order": [{"name": s} for s in SCENES],
        "sources": [_scene_source(s, i) for i, s in enumerate(SCENES)],
        "modules": {"scripts-tool": [{"path": str(SCRIPT), "settings": settings}]},
    }
    (config / "basic" / "scenes" / "streamnode-test.json").write_text(json.dumps(collection), encoding="utf-8")


def _wait(check: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(step)
    return None


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []


class _Rig:
    """Every process the scenario starts, each with its log file; `close()` ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self._files: list[TextIO] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        proc = subprocess.Popen(argv, cwd=self.tmp, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> list[str]:
        return _lines(self.tmp / f"{name}.log")

    def node(self, ports: tuple[int, int]) -> subprocess.Popen:
        return self.start(f"node-{ports[0]}", [
            sys.executable, "-m", "streamnode.cli", "run", "--engine", "passthrough", "--source", "test://moving",
            "--sink", "null://", "--width", "64", "--height", "64", "--osc-port", str(ports[0]),
            "--set", f"osc.reply_port={ports[1]}", "--log-level", "warning"])

    def watchdog(self, name: str, *args: str, password: str) -> subprocess.Popen:
        return self.start(name, [sys.executable, str(WATCHDOG), "--obs-port", str(OBS_PORT), *args],
                          OBS_WEBSOCKET_PASSWORD=password)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # a crash: no goodbye on OSC
    proc.wait()


class _NodeObserver:
    """Asks node S for its live values from 127.0.0.2, so the script keeps 127.0.0.1:7001."""

    def __init__(self) -> None:
        from pythonosc.osc_message import OscMessage

        self._parse = OscMessage
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.2", NODE_S[1]))
        self.sock.settimeout(0.05)

    def values(self) -> dict[str, Any]:
        """prompt, guidance and t_index from one full status reply ({} if none came)."""
        self.sock.sendto(b"/status\x00,\x00\x00\x00", ("127.0.0.1", NODE_S[0]))
        got: dict[str, Any] = {}
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            msg = self._parse(data)
            key = msg.address.removeprefix("/streamnode/applied/")
            if key in IN_FORCE and msg.params:
                value = msg.params[0]
                got[key] = round(value, 3) if isinstance(value, float) else value
        return got

    def close(self) -> None:
        self.sock.close()


def _scenario() -> dict[str, Any]:
    import logging

    import obsws_python

    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 1)  # its tracebacks while OBS starts
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    out: dict[str, Any] = {"isolated": all(" lo " in line for line in addrs.splitlines())}
    tmp = Path(tempfile.mkdtemp(prefix="streamnode-obs-"))
    rig = _Rig(tmp)
    observer = operator = None
    try:
        password = secrets.token_urlsafe(12)
        home = tmp / "home"
        _obs_home(home, password)
        display_file = tmp / "display"
        with open(display_file, "w") as fd:
            xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(fd.fileno()), "-screen", "0", "1280x720x24",
                                     "-nolisten", "tcp"], pass_fds=(fd.fileno(),), stderr=subprocess.DEVNULL)
        rig.procs.append(xvfb)
        display = ":" + _wait(lambda: display_file.read_text().strip(), 20)

        # The watchdog first: OBS is not up yet.
        rig.watchdog("watchdog", "--fallback-scene", "BRB", "--node-port", str(NODE_W[0]), "--reply-port",
                     str(NODE_W[1]), "--timeout", "2.5", "--recover", "1", password=password)
        node_w = rig.node(NODE_W)
        node_s = rig.node(NODE_S)
        observer = _NodeObserver()
        started = time.monotonic()
        rig.start("obs", ["obs", "--multi", "--collection", "streamnode-test", "--profile", "streamnode-test",
                          "--disable-missing-files-check"],
                  HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), DISPLAY=display)

        def connect() -> Any:
            with contextlib.suppress(Exception):
                return obsws_python.ReqClient(host="127.0.0.1", port=OBS_PORT, password=password, timeout=3)
            return None

        operator = _wait(connect, 60, step=0.5)
        assert operator is not None, "OBS's websocket never came up:\n" + "\n".join(rig.log("obs")[-40:])
        out["obs_up_s"] = round(time.monotonic() - started, 1)

        def scene() -> str:
            return operator.get_current_program_scene().current_program_scene_name

        def cut_to(name: str, timeout: float) -> float | None:
            t0 = time.monotonic()
            return round(time.monotonic() - t0, 2) if _wait(lambda: scene() == name, timeout) else None

        def samples(seconds: float) -> list[str]:
            end, seen = time.monotonic() + seconds, []
            while time.monotonic() < end:
                seen.append(scene())
                time.sleep(0.05)
            return seen

        rig.watchdog("missing_scene_watchdog", "--fallback-scene", "Be right back", "--node-port", "7200",
                     "--reply-port", "7201", password=password)
        wrong_started = time.monotonic()
        rig.watchdog("wrong_password_watchdog", "--fallback-scene", "BRB", "--node-port", "7300",
                     "--reply-port", "7301", password="not-" + password)

        # 1. The script: the panel's values reach node S when it appears, preset first.
        out["script_loaded"] = bool(_wait(lambda: any("Loaded python script: streamnode_obs.py" in line
                                                      for line in rig.log("obs")), 30))
        out["values_at_start"] = _wait(lambda: (v := observer.values()) == IN_FORCE and v, 20) or observer.values()

        # 2. The script's fallback: S dies → BRB; S returns → Live, and gets the panel again.
        _wait(lambda: any("fallback scene 'BRB' is ready" in line for line in rig.log("obs")), 10)
        _kill(node_s)
        out["script_cut_s"] = cut_to("BRB", 12)
        node_s = rig.node(NODE_S)
        out["script_back_s"] = cut_to("Live", 25)
        out["values_after_restart"] = _wait(lambda: (v := observer.values()) == IN_FORCE and v, 20) or observer.values()

        # 3. The watchdog: connected (it retries every 5 s) and armed, then W dies.
        _wait(lambda: any("fallback scene 'BRB' is ready" in line for line in rig.log("watchdog"))
              and any("node streaming" in line for line in rig.log("watchdog")), 20)
        _kill(node_w)
        out["wd_cut_s"] = cut_to("BRB", 12)
        operator.set_current_program_scene("Interview")  # the operator takes over during the outage
        out["held_during_outage"] = samples(1.5)
        node_w = rig.node(NODE_W)
        _wait(lambda: sum("node streaming" in line for line in rig.log("watchdog")) >= 2, 20)
        out["held_after_recovery"] = samples(2.0)  # longer than --recover 1
        _kill(node_w)
        out["wd_second_cut_s"] = cut_to("BRB", 12)
        node_w = rig.node(NODE_W)
        out["wd_back_to_operator_s"] = cut_to("Interview", 25)

        # The wrong password is tried every 5 s: wait for OBS to have refused it twice.
        def refusals() -> int:
            return sum("Authentication failed" in line for line in rig.log("obs"))

        _wait(lambda: refusals() >= 2, max(0.0, wrong_started + 15 - time.monotonic()), step=0.2)
        out["wrong_password_tries"] = refusals()

        windows = subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True,
                                 env={**os.environ, "DISPLAY": display}).stdout
        out["obs_window_seen"] = "Profile: streamnode-test" in windows
        shown = False
        for window_id in re.findall(r"^\s*(0x[0-9a-f]+) \"Script Log\"", windows, re.M):
            info = subprocess.run(["xwininfo", "-id", window_id], capture_output=True, text=True,
                                  env={**os.environ, "DISPLAY": display}).stdout
            shown = shown or "IsViewable" in info
        out["script_log_window"] = shown
    finally:
        if operator is not None:
            with contextlib.suppress(Exception):
                operator.disconnect()
        if observer is not None:
            observer.close()
        rig.close()
        stamp = re.compile(r"^\d\d:\d\d:\d\d ")
        for name in ("watchdog", "missing_scene_watchdog", "wrong_password_watchdog"):
            out[name] = [stamp.sub("", line) for line in rig.log(name)]
        obs_log = rig.log("obs")
        out["script_log"] = [line for line in obs_log if "[Python: streamnode_obs.py]" in line]
        out["script_warnings"] = [line for line in out["script_log"] if not line.startswith("info:")]
        out["obs_log_tail"] = obs_log[-15:]
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["scenario"]:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_scenario()), flush=True)
