"""OSCQuery over real HTTP and websockets on 127.0.0.1, on a real node (the tiny model): the tree
checked against the spec's JSON rules and parsed by an independent implementation
(python-oscquery), values on every readable node, LISTEN/IGNORE and PATH_CHANGED, and the
bounds (many clients, a slow one, one that vanishes, one too many)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from pythonosc.osc_message import OscMessage
from support import Surface, message, small_config, tiny_factory, wait_for

from streamnode.config import RuntimeConfig
from streamnode.control.osc import ADDRESSES, param_address
from streamnode.control.oscquery import OscQueryServer
from streamnode.node import Node

pytest.importorskip("websockets", reason="OSCQuery needs websockets: pip install 'streamnode[oscquery]'")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.fixture
def node(components):  # noqa: ANN001, ANN201
    """A real node (the tiny model, 2 brushes, prefix /vj1) with OSC and OSCQuery, and a surface."""
    surface = Surface()
    running = Node(small_config(**{"osc.enabled": True, "osc.port": 0, "osc.oscquery_port": 0, "osc.prefix": "/vj1",
                                   "osc.reply_port": surface.port, "runtime.max_brushes": 2,
                                   "runtime.max_loras": 2, "runtime.max_controlnets": 2}),
                   engine_factory=tiny_factory(components))
    running.start()
    wait_for(lambda: running.status()["state"] == "streaming", timeout=60, what="streaming")
    surface.node = ("127.0.0.1", running._osc.port)
    yield running, surface
    running.stop()
    surface.sock.close()


def applied(node: Node, surface: Surface, address: str, *args: Any) -> None:
    """Send over OSC and wait for the node's echo of that very value: it is in force."""
    surface.inbox.clear()
    surface.send("/vj1" + address, *args)
    echo = ("/vj1/streamnode/applied" + address, pytest.approx(list(args)))
    wait_for(lambda: echo in surface.collect(0.05) or any(a == "/vj1/streamnode/error" for a, _ in surface.inbox),
             timeout=20, what=f"echo of {address}")
    errors = [p for a, p in surface.inbox if a == "/vj1/streamnode/error"]
    assert not errors, errors


# -- the spec's JSON rules ---------------------------------------------------------------------

_TAGS = set("ifsbhtdScrmTFNI[]")
_BAD_NAME_CHARS = set(" #*,/?[]{}")


def check_spec(node: dict[str, Any], path: str = "/") -> int:
    """Walk an OSCQuery tree and assert the proposal's rules; return the number of methods.

    Containers: FULL_PATH, CONTENTS (an object), no TYPE/VALUE. Methods (leaves): TYPE a type tag
    string, ACCESS 0..3, a VALUE array (one item per tag) on every readable one, RANGE one item
    per tag (null or an object of MIN/MAX/VALS) with the value inside it."""
    assert node["FULL_PATH"] == path, (node["FULL_PATH"], path)
    assert isinstance(node.get("DESCRIPTION", ""), str)
    if "CONTENTS" in node:
        assert isinstance(node["CONTENTS"], dict) and node["CONTENTS"], path
        assert "TYPE" not in node and "VALUE" not in node, f"{path} is a container and a method"
        assert node.get("ACCESS", 0) == 0
        count = 0
        for name, child in node["CONTENTS"].items():
            assert name and not (set(name) & _BAD_NAME_CHARS), name
            count += check_spec(child, path.rstrip("/") + "/" + name)
        return count
    tags = node["TYPE"]
    assert isinstance(tags, str) and tags and set(tags) <= _TAGS, (path, tags)
    access = node["ACCESS"]
    assert access in (1, 2, 3), (path, access)
    if access & 1:
        assert "VALUE" in node, f"{path} is readable and has no VALUE"
    if "VALUE" in node:
        value = node["VALUE"]
        assert isinstance(value, list) and len(value) == len(tags), (path, tags, value)
        for tag, v in zip(tags, value, strict=True):
            kind = {"i": int, "h": int, "f": float, "d": float, "s": str, "N": type(None)}[tag]
            assert isinstance(v, kind) and not isinstance(v, bool), (path, tag, v)
    if "RANGE" in node:
        ranges = node["RANGE"]
        assert isinstance(ranges, list) and len(ranges) == len(tags), (path, ranges)
        for r, v in zip(ranges, node.get("VALUE", [None] * len(tags)), strict=True):
            if r is None:
                continue
            assert set(r) <= {"MIN", "MAX", "VALS"} and r, (path, r)
            if "MIN" in r:
                assert v >= r["MIN"] and v <= r["MAX"], (path, v, r)
            if "VALS" in r:
                assert v in r["VALS"] or v == "", (path, v, r)  # "" where none is in force (/preset)
    return 1


def check_host_info(info: dict[str, Any]) -> None:
    assert isinstance(info["NAME"], str) and info["NAME"]
    assert isinstance(info["OSC_PORT"], int) and info["OSC_TRANSPORT"] in ("UDP", "TCP")
    assert all(isinstance(k, str) and isinstance(v, bool) for k, v in info["EXTENSIONS"].items())


def expected_methods(max_brushes: int, prefix: str, max_loras: int = 2, max_controlnets: int = 2) -> set[str]:
    """Every method, each indexed group expanded to all its slots (brushes, LoRAs, ControlNets; LFOs
    and cues at their default counts)."""
    rt = RuntimeConfig()
    slots = {"brush": max_brushes, "lora": max_loras, "controlnet": max_controlnets, "lfo": rt.max_lfos,
             "cues": rt.max_cues}
    return {prefix + param_address(p, n) for p in ADDRESSES for n in (range(slots[p.group]) if p.group else [None])}


# -- the tree -----------------------------------------------------------------------------------


def test_the_address_table_is_a_proper_osc_tree() -> None:
    """Methods are leaves: no address (brushes expanded) is also a container of another, so
    clients that build a tree from the address space (Chataigne, ossia, python-oscquery) can."""
    paths = expected_methods(8, "")
    for path in paths:
        parts = path.split("/")
        for i in range(2, len(parts)):
            assert "/".join(parts[:i]) not in paths, f"{'/'.join(parts[:i])} is a method and a container of {path}"


def test_a_group_without_a_slot_count_lists_its_members_in_force_and_follows_them() -> None:
    """The tree and PATH_CHANGED come from LiveState's indexed groups: with no slot count for a
    group, exactly the members in force are listed, and one that comes or goes is a changed path."""
    from streamnode.control.oscquery_tree import AddressTree
    from streamnode.live_params import BrushParams, BrushState, LiveState

    tree = AddressTree("/x", slots={})
    empty = LiveState()
    assert set(tree.describe(empty, "/x/brush")["CONTENTS"]) == {"order"}
    tree.changes(empty)
    two = empty.replace(brushes={2: BrushState(BrushParams(prompt="a hat"))}, brush_order=(2,))
    brush = tree.describe(two, "/x/brush")
    assert set(brush["CONTENTS"]) == {"2", "order"} and brush["CONTENTS"]["2"]["DESCRIPTION"] == "brush 2"
    values, paths = tree.changes(two)
    assert paths == ["/x/brush/2"]
    assert dict(values)["/x/brush/2/prompt"] == message("/x/brush/2/prompt", "a hat")
    assert tree.changes(two) == ([], [])
    assert tree.changes(empty)[1] == ["/x/brush/2"]
    assert tree.describe(empty, "/x/brush/2") is None


def test_tree_has_every_parameter_with_types_ranges_and_values(node) -> None:
    running, _ = node
    port = running._osc.oscquery_port
    status, root = get(port, "/")
    assert status == 200 and root["FULL_PATH"] == "/"
    vj1 = root["CONTENTS"]["vj1"]["CONTENTS"]
    guidance = vj1["guidance"]
    assert guidance == {"FULL_PATH": "/vj1/guidance", "TYPE": "f", "ACCESS": 3, "VALUE": [1.2],
                        "RANGE": [{"MIN": 0.0, "MAX": 20.0}], "DESCRIPTION": guidance["DESCRIPTION"]}
    assert vj1["t_index"]["TYPE"] == "i" and vj1["t_index"]["VALUE"] == [35]
    assert vj1["t_index"]["RANGE"] == [{"MIN": 0, "MAX": 49}]
    prompt = vj1["prompt"]  # a method, a leaf; its relatives are siblings
    assert prompt["TYPE"] == "s" and "CONTENTS" not in prompt and "RANGE" not in prompt
    assert vj1["prompt_blend"]["TYPE"] == "sf" and vj1["prompt_blend"]["RANGE"][0] is None
    assert vj1["blend_method"]["RANGE"] == [{"VALS": ["linear", "slerp"]}]
    assert "demo" in vj1["preset"]["RANGE"][0]["VALS"]
    assert {k: vj1["status"][k] for k in ("TYPE", "ACCESS", "VALUE")} == {"TYPE": "N", "ACCESS": 2, "VALUE": [None]}
    brushes = vj1["brush"]["CONTENTS"]
    assert set(brushes) == {"0", "1", "order"}  # max_brushes=2, and /brush/order beside them
    assert brushes["1"]["DESCRIPTION"] == "brush 1 (not in use)"
    assert brushes["1"]["CONTENTS"]["rect"]["TYPE"] == "ffff"
    assert brushes["1"]["CONTENTS"]["strength"]["DESCRIPTION"] == "Brush 1 mask strength."
    # Every method the node listens on is in the tree, and nothing else.
    methods: set[str] = set()

    def walk(n: dict[str, Any]) -> None:
        if "CONTENTS" in n:
            for child in n["CONTENTS"].values():
                walk(child)
        else:
            methods.add(n["FULL_PATH"])

    walk(root)
    assert methods == expected_methods(2, "/vj1")


def test_every_readable_node_has_its_value_and_the_tree_follows_the_spec(node) -> None:
    running, surface = node
    port = running._osc.oscquery_port
    assert check_spec(get(port, "/")[1]) == len(expected_methods(2, "/vj1"))
    # Values that are not in force (a strength while t_index rules, the prompt while a blend
    # does, brush 1's mask sources, brush 0 not in use) read as empty values of their type.
    applied(running, surface, "/prompt_blend", "a cat", 0.7, "a dog", 0.3)
    applied(running, surface, "/brush/1/rect", 0.1, 0.2, 0.3, 0.4)
    applied(running, surface, "/brush/1/prompt", "a hat")
    root = get(port, "/")[1]
    assert check_spec(root) == len(expected_methods(2, "/vj1"))
    vj1 = root["CONTENTS"]["vj1"]["CONTENTS"]
    assert vj1["prompt"]["VALUE"] == [""]
    assert vj1["prompt_blend"]["TYPE"] == "sfsf" and vj1["prompt_blend"]["VALUE"] == ["a cat", 0.7, "a dog", 0.3]
    assert vj1["strength"]["VALUE"] == [0.0] and vj1["preset"]["VALUE"] == [""]
    assert vj1["model"]["VALUE"] == ["tiny"]
    one = vj1["brush"]["CONTENTS"]["1"]
    assert one["DESCRIPTION"] == "brush 1"
    assert one["CONTENTS"]["prompt"]["VALUE"] == ["a hat"]
    assert one["CONTENTS"]["rect"]["VALUE"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert one["CONTENTS"]["circle"]["VALUE"] == [0.0, 0.0, 0.0] and one["CONTENTS"]["shm"]["VALUE"] == [""]
    assert vj1["brush"]["CONTENTS"]["order"]["VALUE"] == [1]
    assert vj1["brush"]["CONTENTS"]["0"]["CONTENTS"]["enabled"]["VALUE"] == [0]
    # A single attribute, and a container
    assert get(port, "/vj1/brush/1/prompt?VALUE") == (200, {"VALUE": ["a hat"]})
    assert get(port, "/vj1/brush?FULL_PATH") == (200, {"FULL_PATH": "/vj1/brush"})
    assert get(port, "/vj1/brush?VALUE")[0] == 204


def test_an_independent_client_parses_the_whole_tree(node) -> None:
    """python-oscquery (PyPI) builds the tree and reads HOST_INFO, as a client would."""
    pythonoscquery = pytest.importorskip("pythonoscquery.osc_query_client", reason="pip install python-oscquery")
    from zeroconf import ServiceInfo

    running, surface = node
    applied(running, surface, "/brush/0/circle", 0.5, 0.5, 0.25)
    port = running._osc.oscquery_port
    info = ServiceInfo("_oscjson._tcp.local.", "streamnode._oscjson._tcp.local.",
                       addresses=[socket.inet_aton("127.0.0.1")], port=port)
    client = pythonoscquery.OSCQueryClient(info)
    host = client.get_host_info()
    assert host.osc_port == running._osc.port and host.osc_transport == "UDP" and host.extensions["LISTEN"]
    root = client.query_node("/")
    parsed = {n.full_path: n for n in root}
    ours = get(port, "/")[1]

    def methods(n: dict[str, Any]) -> list[dict[str, Any]]:
        return [m for c in n["CONTENTS"].values() for m in methods(c)] if "CONTENTS" in n else [n]

    for method in methods(ours):
        theirs = parsed[method["FULL_PATH"]]
        assert not theirs.is_container and theirs.value == method["VALUE"] and int(theirs.access) == method["ACCESS"]
    assert parsed["/vj1/brush/0/circle"].value == [0.5, 0.5, 0.25]
    assert client.query_node("/vj1/guidance").value == [1.2]


def test_a_value_that_just_changed_is_served(node) -> None:
    running, surface = node
    port = running._osc.oscquery_port
    applied(running, surface, "/guidance", 3.5)
    assert get(port, "/vj1/guidance?VALUE") == (200, {"VALUE": [3.5]})
    applied(running, surface, "/t_index", 10, 20, 30)
    node_json = get(port, "/vj1/t_index")[1]
    assert node_json["TYPE"] == "iii" and node_json["VALUE"] == [10, 20, 30] and len(node_json["RANGE"]) == 3


def test_host_info_and_errors(node) -> None:
    running, _ = node
    port = running._osc.oscquery_port
    status, info = get(port, "/?HOST_INFO")
    assert status == 200
    check_host_info(info)
    assert info["OSC_PORT"] == running._osc.port and info["OSC_IP"] == "127.0.0.1"
    assert info["NAME"] == "streamnode /vj1"
    assert info["EXTENSIONS"]["VALUE"] and info["EXTENSIONS"]["LISTEN"] and info["EXTENSIONS"]["PATH_CHANGED"]
    assert get(port, "/vj1/nope")[0] == 404
    assert get(port, "/vj1/guidance?BOGUS")[0] == 400
    assert get(port, "/vj1/status?RANGE")[0] == 204
    assert get(port, "/vj1/guidance?TYPE") == (200, {"TYPE": "f"})


# -- LISTEN, IGNORE, PATH_CHANGED ----------------------------------------------------------------


class Listener:
    """A websocket client (the websockets library's): LISTEN/IGNORE, and what it received."""

    def __init__(self, port: int) -> None:
        self._closing = contextlib.ExitStack()
        self.ws = self._closing.enter_context(connect(f"ws://127.0.0.1:{port}/", open_timeout=10))
        self.values: list[tuple[str, list[Any]]] = []
        self.notes: list[dict[str, Any]] = []

    def command(self, verb: str, path: str) -> None:
        self.ws.send(json.dumps({"COMMAND": verb, "DATA": path}))

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.ws.recv(timeout=left)
            except TimeoutError:
                return
            if isinstance(message, bytes):
                msg = OscMessage(message)
                self.values.append((msg.address, list(msg.params)))
            else:
                self.notes.append(json.loads(message))

    def wait(self, check: Any, timeout: float = 20.0, what: str = "") -> None:
        wait_for(lambda: (self.read(0.05), check())[1], timeout=timeout, what=what)

    def read_always(self) -> None:
        """Read on a thread of its own until closed (a client that keeps up, whatever the test does)."""
        def loop() -> None:
            try:
                while True:
                    self.read(1.0)
            except ConnectionClosed:
                pass

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        self._closing.close()


def test_listen_delivers_every_applied_change_as_osc_and_path_changed_follows_brushes(node) -> None:
    running, surface = node
    port = running._osc.oscquery_port
    a, b = Listener(port), Listener(port)
    try:
        a.command("LISTEN", "/vj1/guidance")
        a.wait(lambda: ("/vj1/guidance", [pytest.approx(1.2)]) in a.values, what="the value now, on LISTEN")
        b.command("LISTEN", "/vj1/brush")  # a container: everything under it
        b.wait(lambda: len(b.values) >= 2 * 10 + 1, what="every brush value now")
        a.values.clear()
        b.values.clear()
        applied(running, surface, "/guidance", 3.5)
        a.wait(lambda: ("/vj1/guidance", [3.5]) in a.values, what="the applied change")
        # A brush comes: its values arrive as OSC, and every client is told to re-read it.
        applied(running, surface, "/brush/1/prompt", "a hat")
        b.wait(lambda: ("/vj1/brush/1/prompt", ["a hat"]) in b.values, what="brush value")
        note = {"COMMAND": "PATH_CHANGED", "DATA": "/vj1/brush/1"}
        a.wait(lambda: note in a.notes, what="PATH_CHANGED to a client that listens elsewhere")
        b.wait(lambda: note in b.notes and ("/vj1/brush/order", [1]) in b.values, what="PATH_CHANGED, order")
        assert not any(address.startswith("/vj1/brush") for address, _ in a.values)  # not listened to
        # IGNORE: no more values from there; the brush goes: PATH_CHANGED again.
        a.command("IGNORE", "/vj1/guidance")
        a.read(0.3)
        a.notes.clear()
        applied(running, surface, "/guidance", 4.5)
        applied(running, surface, "/brush/1/clear")
        a.wait(lambda: note in a.notes, what="PATH_CHANGED when the brush goes")
        b.wait(lambda: ("/vj1/brush/1/prompt", [""]) in b.values, what="the cleared brush reads empty")
        assert ("/vj1/guidance", [4.5]) not in a.values
        # A method whose type changes (2 steps → 3) is a changed path too.
        b.command("LISTEN", "/vj1/t_index")
        applied(running, surface, "/t_index", 10, 20, 30)
        b.wait(lambda: ("/vj1/t_index", [10, 20, 30]) in b.values, what="t_index")
        b.wait(lambda: {"COMMAND": "PATH_CHANGED", "DATA": "/vj1/t_index"} in b.notes, what="type change")
    finally:
        a.close()
        b.close()


def test_bad_commands_are_ignored_and_the_client_stays(node) -> None:
    running, surface = node
    listener = Listener(running._osc.oscquery_port)
    try:
        for bad in ("not json", "[1, 2]", json.dumps({"COMMAND": "FLY", "DATA": "/vj1/guidance"}),
                    json.dumps({"COMMAND": "LISTEN", "DATA": 3}), json.dumps({"COMMAND": "LISTEN", "DATA": "/nope"})):
            listener.ws.send(bad)
        listener.ws.send(b"/vj1/guidance\x00\x00\x00,f\x00\x00@\x00\x00\x00")  # OSC here is not read
        listener.command("LISTEN", "/vj1/delta")
        listener.wait(lambda: ("/vj1/delta", [1.0]) in listener.values, what="a good LISTEN after bad ones")
        assert all(address == "/vj1/delta" for address, _ in listener.values)
        assert running._osc._oscquery.clients == 1
    finally:
        listener.close()


def test_many_clients_a_stalled_one_and_one_that_vanishes_do_not_hold_up_the_node(node) -> None:
    running, surface = node
    port = running._osc.oscquery_port
    listeners = [Listener(port) for _ in range(10)]
    for listener in listeners:
        listener.command("LISTEN", "/")
    # A client that never reads again (its socket buffers fill), and one that vanishes (RST).
    stalled = raw_websocket(port, rcvbuf=4096)
    stalled.sendall(text_frame(json.dumps({"COMMAND": "LISTEN", "DATA": "/"})))
    gone = raw_websocket(port)
    gone.sendall(text_frame(json.dumps({"COMMAND": "LISTEN", "DATA": "/"})))
    wait_for(lambda: running._osc._oscquery.clients == 12, timeout=20, what="12 clients")
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()
    try:
        frames = running.status()["frames_out"]
        for i in range(20):  # long prompts: the stalled client's buffers fill
            applied(running, surface, "/negative_prompt", f"{i} " + "x" * 3000)
        applied(running, surface, "/guidance", 7.0)
        for listener in listeners:
            listener.wait(lambda listener=listener: ("/vj1/guidance", [7.0]) in listener.values, what="every client")
        wait_for(lambda: running.status()["frames_out"] > frames + 10, timeout=20, what="frames still flow")
        wait_for(lambda: running._osc._oscquery.clients <= 11, timeout=30, what="the vanished client dropped")
    finally:
        stalled.close()
        for listener in listeners:
            listener.close()


# -- the server alone: bounds --------------------------------------------------------------------


def raw_websocket(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A websocket opened by hand, so the test decides whether it reads at all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(1)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return sock


def text_frame(text: str) -> bytes:
    """One masked client text frame (RFC 6455), payload under 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frames(sock: socket.socket, seconds: float) -> list[bytes]:
    """Server frames (unmasked) read for `seconds`: their payloads."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    frames, i = [], 0
    while i + 2 <= len(data):
        n = data[i + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[i + 2:i + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[i + 2:i + 10], "big"), 10
        if i + head + n > len(data):
            break
        frames.append(data[i + head:i + head + n])
        i += head + n
    return frames


@pytest.fixture
def server():  # noqa: ANN201
    """An OscQueryServer with one method, /a, whose value the test publishes."""
    value = {"now": b""}
    q = OscQueryServer("127.0.0.1", 0, lambda path: {"FULL_PATH": "/a", "TYPE": "is"} if path == "/a" else None,
                       lambda: {"NAME": "t", "OSC_PORT": 1, "OSC_TRANSPORT": "UDP", "EXTENSIONS": {}},
                       lambda path: [("/a", value["now"])] if path in ("/", "/a") else None,
                       max_clients=3, send_timeout_s=2.0)
    q.start()
    yield q, value
    q.stop()


def osc_a(i: int, size: int) -> bytes:
    from streamnode.control.oscquery_tree import packet

    return packet("/a", (("i", i), ("s", "x" * size)))


def test_a_stalled_client_skips_to_the_newest_value_and_is_dropped_publish_never_waits(server) -> None:
    q, value = server
    value["now"] = osc_a(0, 10)
    stalled = raw_websocket(q.port, rcvbuf=4096)
    stalled.sendall(text_frame(json.dumps({"COMMAND": "LISTEN", "DATA": "/a"})))
    fast = Listener(q.port)
    fast.command("LISTEN", "/a")
    wait_for(lambda: q.clients == 2, what="2 clients")
    fast.read_always()
    wait_for(lambda: fast.values, what="the value on LISTEN")
    slowest = 0.0
    for i in range(1, 60):  # 60 × 64 KiB: more than the stalled client's socket buffers
        t = time.perf_counter()
        q.publish([("/a", osc_a(i, 64 * 1024))])
        slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.002)
    # Had publish() waited on the stalled client, it would have waited out the send timeout (2 s).
    assert slowest < 1.0, f"publish() waited {slowest:.3f} s on a client"
    wait_for(lambda: fast.values[-1][1][0] == 59, timeout=20, what="the fast client has the last value")
    # The stalled client could take no send for send_timeout_s: it is dropped.
    wait_for(lambda: q.clients == 1, timeout=10, what="the stalled client dropped")
    assert q.counters["dropped"] == 1
    stalled.close()
    fast.close()


def test_a_slow_client_that_catches_up_gets_the_newest_not_a_backlog(server) -> None:
    q, value = server
    value["now"] = osc_a(0, 10)
    slow = raw_websocket(q.port, rcvbuf=4096)
    slow.sendall(text_frame(json.dumps({"COMMAND": "LISTEN", "DATA": "/a"})))
    wait_for(lambda: q.clients == 1, what="the client")
    time.sleep(0.2)
    for i in range(1, 300):  # 300 × 4 KiB while it does not read for a moment
        q.publish([("/a", osc_a(i, 4096))])
    frames = read_frames(slow, 1.0)  # now it reads
    numbers = [OscMessage(f).params[0] for f in frames if f.startswith(b"/a")]
    assert numbers[-1] == 299, numbers[-5:]
    assert len(numbers) < 150, f"{len(numbers)} messages: a backlog, not the newest value"
    assert numbers == sorted(numbers)
    slow.close()


def test_one_client_too_many_is_refused_and_the_allow_list_holds(server) -> None:
    q, _ = server
    clients = [Listener(q.port) for _ in range(3)]
    try:
        wait_for(lambda: q.clients == 3, what="3 clients")
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{q.port}/", open_timeout=10)
        assert refused.value.response.status_code == 503
        clients.pop().close()
        wait_for(lambda: q.clients == 2, what="a place free")
        clients.append(Listener(q.port))
    finally:
        for c in clients:
            c.close()
    denied = OscQueryServer("127.0.0.1", 0, lambda path: {}, lambda: {}, allowed=lambda host: False)
    denied.start()
    try:
        assert get(denied.port, "/")[0] == 403
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{denied.port}/", open_timeout=10)
    finally:
        denied.stop()
        denied.stop()


def test_stop_closes_clients_and_returns(server) -> None:
    q, _ = server
    listener = Listener(q.port)
    listener.command("LISTEN", "/a")
    wait_for(lambda: q.clients == 1, what="a client")
    t = time.monotonic()
    q.stop(timeout=2.0)
    assert time.monotonic() - t < 3.0
    with pytest.raises(ConnectionClosed):
        for _ in range(100):
            listener.ws.recv(timeout=0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("oscquery-ws")]

