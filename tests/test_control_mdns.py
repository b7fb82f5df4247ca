"""OSCQuery's mDNS announcement, for real, inside a loopback-only network namespace.

The node's OSC server with `osc.oscquery_mdns` announces `_oscjson._tcp` and `_osc._udp` on
127.0.0.1; an independent browser (python-oscquery's, on zeroconf) finds both, and its
OSCQueryClient reads HOST_INFO and the whole tree from what it found; on stop the services are
withdrawn. Nothing here can reach beyond 127.0.0.1: the scenario runs under `unshare -n`, started
by this file as a script (like tests/test_io_ndi.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import MULTICAST_ROUTED, netns_problem, run_scenario

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


@pytest.mark.netns
@pytest.mark.slow
def test_mdns_announces_oscquery_and_osc_on_loopback_and_withdraws_them() -> None:
    pytest.importorskip("zeroconf", reason="pip install 'streamnode[oscquery]'")
    pytest.importorskip("pythonoscquery", reason="pip install python-oscquery")
    problem = netns_problem()
    if problem:
        pytest.skip(problem)
    # mDNS is multicast: loopback carries it once it is marked multicast-capable and routed.
    r = run_scenario(HERE, "scenario", setup=MULTICAST_ROUTED)
    assert r["links"] == ["lo"], "the namespace must have only loopback"
    assert r["oscjson"] == {"name": "streamnode /mdns._oscjson._tcp.local.", "addresses": ["127.0.0.1"],
                            "port": r["oscquery_port"]}
    assert r["osc"] == {"name": "streamnode /mdns._osc._udp.local.", "addresses": ["127.0.0.1"], "port": r["osc_port"]}
    assert r["host_info"] == {"name": "streamnode /mdns", "osc_port": r["osc_port"], "transport": "UDP"}
    from streamnode.config import RuntimeConfig
    from streamnode.control.osc import ADDRESSES
    from streamnode.live_params import GROUPS

    rt = RuntimeConfig()
    # Every slot of every indexed group is listed: the scenario's 2 brushes, the others' defaults.
    slots = {None: 1, **{g.name: getattr(rt, g.limit) for g in GROUPS}, "brush": 2}
    assert r["guidance"] == [1.2] and r["methods"] == sum(slots[p.group] for p in ADDRESSES)
    assert r["withdrawn"], "stopping the node withdraws the services"


def test_mdns_without_zeroconf_is_a_warning_not_a_failure(caplog, monkeypatch) -> None:
    import builtins

    from streamnode.control.discovery import Announcement

    real_import = builtins.__import__

    def no_zeroconf(name: str, *args: object, **kwargs: object) -> object:
        if name == "zeroconf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zeroconf)
    announcement = Announcement("streamnode", "127.0.0.1", 7002, 7000)
    announcement.start()
    announcement.stop()
    announcement.stop()
    assert any("pip install 'streamnode[oscquery]'" in r.getMessage() for r in caplog.records)
    assert not announcement.announced.is_set()


# -- the scenario, run inside the namespace ---------------------------------------------------


def scenario() -> dict:
    import socket

    from pythonoscquery.osc_query_browser import OSCQueryBrowser
    from pythonoscquery.osc_query_client import OSCQueryClient

    from streamnode.config import OscConfig
    from streamnode.control.osc import OscServer
    from streamnode.control.updates import ControlQueue
    from streamnode.live_params import LiveState

    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    config = OscConfig(enabled=True, port=0, oscquery_port=0, oscquery_mdns=True, prefix="/mdns")
    server = OscServer(config, ControlQueue(), live=LiveState, max_brushes=2)
    server.start()
    browser = OSCQueryBrowser()

    def found() -> tuple:
        return browser.get_discovered_oscquery(), browser.get_discovered_osc()

    deadline = time.monotonic() + 30
    while not all(found()) and time.monotonic() < deadline:
        time.sleep(0.1)
    (oscjson, *_), (osc, *_) = found()

    def described(info) -> dict:  # noqa: ANN001
        return {"name": info.name, "addresses": [socket.inet_ntoa(a) for a in info.addresses], "port": info.port}

    client = OSCQueryClient(oscjson)
    host = client.get_host_info()
    root = client.query_node("/")
    result = {
        "links": [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()],
        "oscquery_port": server.oscquery_port, "osc_port": server.port,
        "oscjson": described(oscjson), "osc": described(osc),
        "host_info": {"name": host.name, "osc_port": host.osc_port, "transport": host.osc_transport},
        "methods": sum(1 for node in root if not node.is_container),
        "guidance": client.query_node("/mdns/guidance").value,
    }
    server.stop()
    deadline = time.monotonic() + 10
    while any(found()) and time.monotonic() < deadline:
        time.sleep(0.1)
    result["withdrawn"] = not any(found())
    browser.zc.close()
    return result


if __name__ == "__main__" and sys.argv[1:] == ["scenario"]:
    print(json.dumps(scenario()), flush=True)
