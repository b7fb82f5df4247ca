"""OSCQuery over real HTTP on 127.0.0.1: the tree, types, ranges, host info, and a value that
just changed over OSC."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder
from support import small_config, tiny_factory, wait_for, wait_osc

from streamnode.control.oscquery import OscQueryServer, build_tree, find_node
from streamnode.node import Node


def send(sock: socket.socket, port: int, address: str, *args: Any) -> None:
    builder = OscMessageBuilder(address)
    for a in args:
        builder.add_arg(a)
    sock.sendto(builder.build().dgram, ("127.0.0.1", port))


def wait_echo(sock: socket.socket, address: str, timeout: float = 3.0) -> list[Any]:
    msg = wait_osc(sock, lambda m: m.address == address, timeout)
    assert msg is not None, f"no {address}"
    return msg.params


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.fixture
def node(components):  # noqa: ANN001, ANN201
    """A real node (the tiny model, 2 brushes) with OSC and OSCQuery, and a surface socket."""
    surface = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    surface.bind(("127.0.0.1", 0))
    running = Node(small_config(**{"osc.enabled": True, "osc.port": 0, "osc.oscquery_port": 0, "osc.prefix": "/vj1",
                                   "osc.reply_port": surface.getsockname()[1], "runtime.max_brushes": 2}),
                   engine_factory=tiny_factory(components))
    running.start()
    wait_for(lambda: running.status()["state"] == "streaming", timeout=30, what="streaming")
    yield running._osc, surface
    running.stop()
    surface.close()


def test_tree_has_every_parameter_with_types_ranges_and_values(node) -> None:
    server, _ = node
    status, root = get(server.oscquery_port, "/")
    assert status == 200 and root["FULL_PATH"] == "/"
    vj1 = root["CONTENTS"]["vj1"]
    guidance = vj1["CONTENTS"]["guidance"]
    assert guidance["FULL_PATH"] == "/vj1/guidance"
    assert guidance["TYPE"] == "f"
    assert guidance["RANGE"] == [{"MIN": 0.0, "MAX": 20.0}]
    assert guidance["VALUE"] == [1.2]
    assert guidance["ACCESS"] == 3 and guidance["DESCRIPTION"]
    t_index = vj1["CONTENTS"]["t_index"]
    assert t_index["TYPE"] == "i" and t_index["VALUE"] == [35]
    assert t_index["RANGE"] == [{"MIN": 0, "MAX": 49}]
    prompt = vj1["CONTENTS"]["prompt"]  # a method, a leaf; its relatives are siblings
    assert prompt["TYPE"] == "s" and "CONTENTS" not in prompt
    assert vj1["CONTENTS"]["prompt_blend"]["TYPE"] == "sf"
    assert vj1["CONTENTS"]["blend_method"]["RANGE"] == [{"VALS": ["linear", "slerp"]}]
    assert "demo" in vj1["CONTENTS"]["preset"]["RANGE"][0]["VALS"]
    assert vj1["CONTENTS"]["status"]["ACCESS"] == 2
    brushes = vj1["CONTENTS"]["brush"]["CONTENTS"]
    assert set(brushes) == {"0", "1", "order"}  # max_brushes=2, and /brush/order beside them
    assert brushes["order"]["TYPE"].startswith("i")
    assert brushes["1"]["CONTENTS"]["rect"]["TYPE"] == "ffff"
    assert brushes["1"]["CONTENTS"]["strength"]["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}]


def test_a_value_that_just_changed_is_served(node) -> None:
    server, surface = node
    send(surface, server.port, "/vj1/guidance", 3.5)
    assert wait_echo(surface, "/vj1/streamnode/applied/guidance") == [3.5]
    assert get(server.oscquery_port, "/vj1/guidance?VALUE") == (200, {"VALUE": [3.5]})
    send(surface, server.port, "/vj1/t_index", 10, 20, 30)
    wait_echo(surface, "/vj1/streamnode/applied/t_index")
    status, node_json = get(server.oscquery_port, "/vj1/t_index")
    assert node_json["TYPE"] == "iii" and node_json["VALUE"] == [10, 20, 30]
    send(surface, server.port, "/vj1/brush/1/prompt", "a hat")
    wait_echo(surface, "/vj1/streamnode/applied/brush/1/prompt")
    assert get(server.oscquery_port, "/vj1/brush/1/prompt?VALUE") == (200, {"VALUE": ["a hat"]})


def test_host_info_and_errors(node) -> None:
    server, _ = node
    status, info = get(server.oscquery_port, "/?HOST_INFO")
    assert status == 200
    assert info["OSC_PORT"] == server.port and info["OSC_TRANSPORT"] == "UDP"
    assert info["NAME"] == "streamnode /vj1"
    assert info["EXTENSIONS"]["VALUE"] and info["EXTENSIONS"]["RANGE"] and not info["EXTENSIONS"]["LISTEN"]
    assert get(server.oscquery_port, "/vj1/nope")[0] == 404
    assert get(server.oscquery_port, "/vj1/guidance?BOGUS")[0] == 400
    assert get(server.oscquery_port, "/vj1/status?VALUE")[0] == 204  # a trigger has no value
    assert get(server.oscquery_port, "/vj1/guidance?TYPE") == (200, {"TYPE": "f"})


def test_allow_list_applies_to_http_and_stop_is_safe_twice() -> None:
    q = OscQueryServer("127.0.0.1", 0, lambda: [], lambda: {}, allowed=lambda host: False)
    q.start()
    try:
        assert get(q.port, "/")[0] == 403
    finally:
        q.stop()
        q.stop()


def test_build_tree_and_find_node() -> None:
    tree = build_tree([{"FULL_PATH": "/a/b", "TYPE": "f"}, {"FULL_PATH": "/a", "TYPE": "i"}])
    assert find_node(tree, "/a")["TYPE"] == "i" and "b" in find_node(tree, "/a")["CONTENTS"]
    assert find_node(tree, "/a/b/")["TYPE"] == "f" and find_node(tree, "/a/b")["FULL_PATH"] == "/a/b"
    assert find_node(tree, "/x") is None
    assert find_node(tree, "/") is tree


def test_mdns_without_zeroconf_is_a_warning_not_a_failure(caplog, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_zeroconf(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "zeroconf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zeroconf)
    q = OscQueryServer("127.0.0.1", 0, lambda: [], lambda: {"OSC_PORT": 1}, mdns=True)
    q.start()
    q.stop()
    assert any("zeroconf" in r.getMessage() for r in caplog.records)
