"""Scenarios in a loopback-only network namespace, for everything that announces itself by
multicast or must never reach another address (NDI, mDNS, Ableton Link, OBS with its websocket).

A test file runs itself as a script inside the namespace (`unshare -n`, we are root) and reads
the scenario's last JSON line from its stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "ip link set lo up"
MULTICAST = LOOPBACK + " && ip link set lo multicast on"
"""Loopback that carries multicast (Link); mDNS also needs its group routed: MULTICAST_ROUTED."""
MULTICAST_ROUTED = MULTICAST + " && ip route add 224.0.0.0/4 dev lo"


def netns_problem() -> str | None:
    """Why this machine cannot make a network namespace, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def run_scenario(script: Path, *args: str, setup: str = LOOPBACK, timeout: float = 90,
                 env: dict[str, str] | None = None, tail: int = 4000) -> dict[str, Any]:
    """`python script args` in a new network namespace after `setup`; its last JSON line.

    Asserts the scenario exited 0 and printed one, showing its output otherwise."""
    command = f"{setup} && exec {sys.executable} {script} {' '.join(args)}"
    # Own process group: on a timeout the scenario and everything it started go together.
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", command], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=None if env is None else {**os.environ, **env})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"rc={proc.returncode}\nstdout:\n{stdout[-6000:]}\nstderr:\n{stderr[-tail:]}"
    )
    return json.loads(lines[-1])
