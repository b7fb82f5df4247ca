"""The TouchDesigner kit (touchdesigner/) outside TouchDesigner.

- The Script TOP shm reader and writer, written from docs/shm-format.md, against a real node
  process: writer → `--source shm://` → passthrough engine → `--sink shm://` → reader, pixels
  compared exactly; the Script TOP callbacks themselves driven with stand-in TOP objects.
- The control extension's OSC client and status table against the same node's OSC server,
  and every message the generated parameter page and osc_map.csv can produce against the
  node's validation (nothing may be rejected).

What cannot run here: TouchDesigner itself (copyNumpyArray, numpyArray, custom parameters,
DATs); touchdesigner/README.md lists those steps as unverified.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import struct
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from support import free_udp_port, load_script, small_config, wait_for

from streamnode.control.updates import Update
from streamnode.node import Node

ROOT = Path(__file__).resolve().parent.parent
TD = ROOT / "touchdesigner"
W, H = 96, 64


shm_in = load_script(TD / "streamnode_shm_in.py", "td_streamnode_shm_in")
shm_out = load_script(TD / "streamnode_shm_out.py", "td_streamnode_shm_out")
control = load_script(TD / "streamnode_control.py", "td_streamnode_control")


def unique(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:8]}"  # shm names are machine-wide: never clash with others


# -- a real node: shm in, passthrough, shm out, OSC ----------------------------------------------


class NodeProcess:
    def __init__(self) -> None:
        self.shm_in, self.shm_out = unique("kit_in"), unique("kit_out")
        # The writer exists before the node starts, as when TouchDesigner is already running.
        self.writer = shm_out.ShmFrameWriter(self.shm_in, W, H)
        self.writer.write(np.zeros((H, W, 3), np.uint8))
        self.client = control.NodeClient("127.0.0.1", free_udp_port(), reply_port=0)
        self.osc_port = self.client.target[1]
        cmd = [sys.executable, "-m", "streamnode.cli", "run", "--engine", "passthrough",
               "--source", f"shm://{self.shm_in}", "--sink", f"shm://{self.shm_out}",
               "--width", str(W), "--height", str(H), "--osc-port", str(self.osc_port),
               "--osc-reply", f"127.0.0.1:{self.client.port}", "--duration", "120", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)

    def close(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.writer.close()
        self.client.close()
        return err.decode(errors="replace")


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    n = NodeProcess()
    yield n
    err = n.close()
    assert "Traceback" not in err, err


def distinct_frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(count)]


# -- shm: reader and writer against the node ------------------------------------------------------


def test_frames_go_through_the_node_unchanged(node: NodeProcess) -> None:
    frames = distinct_frames(8)
    reader = shm_in.ShmFrameReader(node.shm_out, retry_s=0.05)
    seen: list[int] = []
    matched: set[int] = set()
    i = 0
    deadline = time.monotonic() + 15
    try:
        while len(matched) < 3 and time.monotonic() < deadline:
            node.writer.write(frames[i % len(frames)])
            i += 1
            got = reader.read()
            if got is not None:
                n, timestamp, pixels = got
                seen.append(n)
                assert pixels.shape == (H, W, 3) and reader.header.pixel_format == shm_in.RGB
                hits = [k for k, f in enumerate(frames) if np.array_equal(pixels, f)]
                if i > 1:  # after the first frame every output must be one of ours, bit for bit
                    assert hits, "a frame came out that was never written (torn or altered)"
                matched.update(hits)
                assert 0 <= shm_in.latency_ms(timestamp) < 5000  # the writer's clock, carried through
            time.sleep(0.01)
    finally:
        reader.close()
    assert len(matched) >= 3, f"matched {matched} after {i} writes, read {seen}"
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # newest only, never twice


class FakeTOP:
    """Stands in for a TOP/Script TOP: numpyArray() out, copyNumpyArray() in, script errors."""

    def __init__(self, op_id: int, name: str, image: np.ndarray | None = None) -> None:
        self.id = op_id
        self.par = types.SimpleNamespace(Shmname=types.SimpleNamespace(eval=lambda: name))
        self.image = image
        self.copied: list[np.ndarray] = []
        self.errors: list[str] = []
        self.inputs: list[FakeTOP] = []

    def numpyArray(self, delayed: bool = False) -> np.ndarray | None:
        return self.image

    def copyNumpyArray(self, array: np.ndarray) -> None:
        self.copied.append(array.copy())

    def addScriptError(self, text: str) -> None:
        self.errors.append(text)

    def clearScriptErrors(self) -> None:
        self.errors.clear()


def test_script_top_callbacks_round_trip(node: NodeProcess) -> None:
    """shm_out's onCook (a float RGBA TOP, bottom row first) → node → shm_in's onCook: the
    Script TOP gets back the same picture, RGBA uint8, bottom row first."""
    rng = np.random.default_rng(3)
    td_image = rng.integers(0, 256, (H, W, 4)).astype(np.float32) / 255.0  # what numpyArray() gives
    td_image[..., 3] = 1.0
    expected = (td_image * 255 + 0.5).astype(np.uint8)
    sender = FakeTOP(2, node.shm_in)
    sender.inputs = [FakeTOP(1, "", td_image)]
    receiver = FakeTOP(3, node.shm_out)
    # The Script TOP takes over the node's input: as when TouchDesigner restarts, the old
    # writer closes and a new one publishes under the same name; the node follows.
    node.writer.close()
    try:
        def received() -> bool:
            shm_out.onCook(sender)
            shm_in.onCook(receiver)
            return bool(receiver.copied) and np.array_equal(receiver.copied[-1], expected)

        wait_for(received, timeout=10, step=0.02)
        assert not sender.errors and not receiver.errors
        assert np.array_equal(sender.copied[-1], td_image)  # the input passes through for viewing
    finally:
        writer = shm_out._writers.pop(sender.id, None)
        if writer is not None:
            writer.close()
        reader = shm_in._readers.pop(receiver.id, None)
        if reader is not None:
            reader.close()
        node.writer = shm_out.ShmFrameWriter(node.shm_in, W, H)  # back for later tests


def test_reader_waits_for_a_missing_segment_and_lets_go_when_closed() -> None:
    name = unique("kit_later")
    reader = shm_in.ShmFrameReader(name, retry_s=0.0)
    assert reader.read() is None and "no shared memory" in reader.error
    receiver = FakeTOP(9, name)
    shm_in.onCook(receiver)
    assert receiver.errors and not receiver.copied  # the node shows why there is no picture
    writer = shm_out.ShmFrameWriter(name, W, H, shm_out.BGRA)
    try:
        frame = np.zeros((H, W, 4), np.uint8)
        frame[0, 0] = (10, 20, 30, 40)  # B G R A, top-left
        writer.write(frame)
        n, _, pixels = reader.read()
        assert n == 1 and reader.read() is None  # nothing newer
        rgba = shm_in.to_td_rgba(pixels, reader.header.pixel_format)
        assert tuple(rgba[H - 1, 0]) == (30, 20, 10, 40)  # now RGBA, and the top row is last
        writer.write(frame)
        assert reader.read()[0] == 2
    finally:
        writer.close()
        shm_in._readers.pop(9, None)
    assert reader.read() is None and reader.shm is None and "closed" in reader.error


def test_reader_drops_a_torn_copy() -> None:
    name = unique("kit_torn")
    writer = shm_out.ShmFrameWriter(name, W, H)
    reader = shm_in.ShmFrameReader(name)
    try:
        writer.write(np.ones((H, W, 3), np.uint8))
        slot = shm_out.HEADER_SIZE + (1 % shm_out.SLOTS) * writer.slot_size
        struct.pack_into("<Q", writer.shm.buf, slot, 0)  # the writer is "in the middle" of frame 1
        assert reader.read() is None and reader.torn == shm_in.MAX_RETRIES
        struct.pack_into("<Q", writer.shm.buf, slot, 1)
        assert reader.read()[0] == 1
    finally:
        reader.close()
        writer.close()


def test_stale_reader_lets_go_so_a_restarted_writer_can_publish() -> None:
    name = unique("kit_stale")
    writer = shm_out.ShmFrameWriter(name, W, H)
    reader = shm_in.ShmFrameReader(name, stale_s=0.5, retry_s=0.0)
    try:
        writer.write(np.zeros((H, W, 3), np.uint8))
        assert reader.read(now=100.0) is not None
        assert reader.read(now=100.2) is None and reader.shm is not None
        assert reader.read(now=101.0) is None and reader.shm is None and "no new frame" in reader.error
    finally:
        reader.close()
        writer.close()


def test_writer_replaces_a_dead_writers_segment_but_not_a_live_ones() -> None:
    name = unique("kit_dead")
    first = shm_out.ShmFrameWriter(name, W, H)
    with pytest.raises(RuntimeError, match="being written by process"):
        # Same name, another live writer: simulate with a pid that is alive and not ours.
        struct.pack_into("<I", first.shm.buf, 48, os.getppid())
        shm_out.ShmFrameWriter(name, W, H)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    struct.pack_into("<I", first.shm.buf, 48, int(dead.stdout))
    first.shm.close()  # "crash": the segment stays behind, marked live, its writer gone
    second = shm_out.ShmFrameWriter(name, W * 2, H)  # bigger: must be a new segment
    try:
        reader = shm_in.ShmFrameReader(name)
        second.write(np.full((H, W * 2, 3), 9, np.uint8))
        n, _, pixels = reader.read()
        assert n == 1 and pixels.shape == (H, W * 2, 3) and pixels[0, 0, 0] == 9
        reader.close()
    finally:
        second.close()


def test_from_td_converts_every_top_format() -> None:
    f = np.zeros((2, 3, 4), np.float32)
    f[0, :, 0] = 1.0  # bottom row red in TouchDesigner
    out = shm_out.from_td(f)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert tuple(out[1, 0]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(shm_out.from_td(np.full((2, 2, 4), 2.0, np.float32))[0, 0]) == (255, 255, 255)  # clipped
    assert tuple(shm_out.from_td(np.full((2, 2, 4), 65535, np.uint16))[0, 0]) == (255, 255, 255)
    assert tuple(shm_out.from_td(np.full((2, 2), 0.5, np.float32))[0, 0]) == (128, 128, 128)  # mono
    u8 = np.arange(2 * 2 * 4, dtype=np.uint8).reshape(2, 2, 4)
    assert np.array_equal(shm_out.from_td(u8), u8[::-1, :, :3])


def test_header_matches_the_documented_layout() -> None:
    """Byte offsets straight from docs/shm-format.md's table."""
    name = unique("kit_layout")
    writer = shm_out.ShmFrameWriter(name, W, H, shm_out.RGBA)
    try:
        writer.write(np.zeros((H, W, 4), np.uint8), timestamp_ns=123)
        buf = bytes(writer.shm.buf[:64])
        assert buf[0:4] == b"SNFR"
        assert struct.unpack_from("<HHIIIIII", buf, 4) == (1, 64, W, H, 4, 3, 3, -(-(64 + W * H * 4) // 64) * 64)
        assert struct.unpack_from("<QQII", buf, 32) == (1, 123, os.getpid(), 1)
        assert buf[56:64] == b"\0" * 8
        slot1 = 64 + 1 * writer.slot_size
        assert struct.unpack_from("<QQ", writer.shm.buf, slot1) == (1, 123)
    finally:
        writer.close()


# -- control: OSC client and status table against the node process ---------------------------------


CODEC_CASES = [("/prompt", ["a neon city"]), ("/seed", [2**32 - 1]), ("/t_index", [20, 35, 45]),
               ("/guidance", [1.5]), ("/status", []), ("/x", [True, False, None])]


@pytest.mark.parametrize(("address", "args"), CODEC_CASES)
def test_codec_matches_python_osc(address: str, args: list[Any]) -> None:
    parsed = OscMessage(control.encode_message(address, args))
    assert (parsed.address, list(parsed.params)) == (address, args)
    builder = OscMessageBuilder(address=address)
    for a in args:
        builder.add_arg(a)
    assert control.decode_message(builder.build().dgram) == (address, args)


def test_status_table_from_the_live_node(node: NodeProcess) -> None:
    board = control.StatusBoard()
    client = node.client
    client.send("/guidance", 1.7)
    client.send("/prompt", "a neon city")

    def complete() -> bool:
        now = time.monotonic()
        for address, args in client.poll():
            board.on_message(address, args, now)
        return board.connected(now) and "applied/prompt" in board.values and "fps" in board.values

    wait_for(complete, timeout=10)
    rows = dict(board.rows(time.monotonic()))
    assert rows["connected"] == "1" and rows["state"] == "streaming"
    assert rows["applied/guidance"] == "1.7" and rows["applied/prompt"] == "a neon city"
    for key in ("heartbeat", "fps", "latency_ms", "dropped", "skipped"):
        assert rows[key] != "", key


# -- control: every generated message passes the node's validation ---------------------------------


class LiveNode:
    """A real node (pass-through engine, brushes and /model enabled) with its OSC server: the
    kit's messages go through the node's own validation, queue, apply and report."""

    def __init__(self, reply_port: int) -> None:
        self.applied: list[Update] = []
        cfg = small_config(**{"runtime.engine": "passthrough", "osc.enabled": True, "osc.port": 0,
                              "osc.reply_port": reply_port, "osc.allow_model_switch": True})
        self.node = Node(cfg)
        self.node.queue.on_report(lambda u, error: error is None and self.applied.append(u))
        self.node.start()
        self.server = self.node._osc
        wait_for(lambda: self.node.status()["state"] == "streaming", what="the node streaming")

    def close(self) -> None:
        self.node.stop()


@pytest.fixture
def live() -> Iterator[tuple[LiveNode, Any]]:
    client = control.NodeClient("127.0.0.1", 1, reply_port=0)
    n = LiveNode(client.port)
    client.target = ("127.0.0.1", n.server.port)
    yield n, client
    n.close()
    client.close()


def example_value(entry: dict[str, Any], mask: str) -> Any:
    style = entry["style"]
    if entry["address"] == "/brush/order":
        return "1 0"
    if entry["address"].endswith("/shm"):  # /brush/0/shm, /brush/1/shm, ...
        return "shm://streamnode_masks?plane=0"
    if entry["address"] in ("/lfo/0/target", "/midi/learn"):
        return "/delta"  # an LFO target, a parameter to learn a knob for
    if entry["address"] == "/quantize":
        return "off"  # the default; "beat" would hold every later change for its beat
    if "repeat" in entry:
        return {"i": "20 35 45", "sf": "a neon city:0.7 | a forest:0.3", "if": "7:0.5 | 42:0.5"}[entry["arg_tags"]]
    if style == "Toggle":
        return True
    if style in ("Int", "Float"):
        lo, hi = entry["min"], entry["max"]
        value = entry.get("default", (lo + hi) / 2)
        if entry.get("arg_count"):
            value = 0.25  # rect/circle parts: small enough to fit
        if style == "Float":
            return (value + hi) / 2 if value < hi else (lo + hi) / 2  # differ from the default
        return value + (1 if value < hi else -1)
    if entry["address"] == "/preset":
        return "demo"  # a preset without brushes: the brushes below are the ones /brush/order orders
    if style == "StrMenu":
        return next(m for m in entry["menu"] if m != entry.get("default"))
    if style == "File":
        return mask
    if entry["address"] == "/model":
        return "another-model"  # the pass-through engine loads for any id
    return "a neon city at night"


def test_every_parameter_of_the_generated_page_is_accepted(live: tuple[LiveNode, Any], tmp_path: Path) -> None:
    n, client = live
    failed: list[tuple[Update, str]] = []
    n.node.queue.on_report(lambda u, error: error is not None and failed.append((u, error)))
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n")  # the pass-through engine checks the path, not the pixels
    params = control.ParamMap(json.loads((TD / "streamnode_params.json").read_text()), brushes=2, lfos=1, cues=1)
    values = {name: example_value(e, str(mask)) for name, e in params.entries.items()}
    messages: dict[str, list[Any]] = {}
    for name in params.entries:
        message = params.message(name, values.__getitem__)
        assert message is not None, name
        messages.setdefault(message[0], message[1])  # the other parts of rect/circle: one message
    # As a user would: the brushes first, then their order, and the clears last.
    last = ([a for a in messages if a == "/brush/order"] + [a for a in messages if a in ("/cue", "/cue_next")]
            + [a for a in messages if a.endswith("/clear")])
    for address in [a for a in messages if a not in last] + last:
        assert client.send(address, *messages[address])
        if address == "/brush/order":
            try:
                wait_for(lambda: n.node.live().brush_order == (1, 0), what="the order applied before the clears")
            except AssertionError:
                raise AssertionError(f"{n.node.live().brush_order}; failed: {failed}") from None
    sent = set(messages)

    def handled() -> bool:  # /status is answered by the OSC server; the rest applied or a repeat
        stats = n.server.stats()
        return stats["accepted"] + stats["deduped"] + stats["rejected"] >= len(sent)

    try:
        wait_for(handled, timeout=5)
        # Toggles are sent on (1): /brush/N/enabled (a new brush already is) and the toggles whose
        # default is on are repeats, dropped.
        on_by_default = {e["address"] for e in params.entries.values() if e["style"] == "Toggle" and e.get("default")}
        repeats = {a for a in sent if a.endswith("/enabled") or a in on_by_default}
        wait_for(lambda: {u.origin for u in n.applied} | {"/status"} >= sent - repeats, timeout=5)
    finally:
        errors = [args for a, args in client.poll() if a.endswith("/error") and args != [""]]
        assert n.server.stats()["rejected"] == 0 and not failed, (errors, failed)
    assert "/brush/1/rect" in sent and "/status" in sent and "/model" in {u.origin for u in n.applied}


def test_every_osc_map_example_is_accepted(live: tuple[LiveNode, Any]) -> None:
    n, client = live
    with open(TD / "osc_map.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["direction"] == "in"]
    sent = 0
    for row in rows:
        call = ast.parse(row["td_dat_call"], mode="eval").body
        address, args = ast.literal_eval(call.args[0]), ast.literal_eval(call.args[1])
        if address.endswith("/mask"):
            continue  # an example path; the test above sends a real file
        if address == "/brush/order":
            # The example orders two brushes: have exactly those (the rows before it cleared brush 0,
            # and the preset example brought its own).
            others = [b for b in n.node.live().brush_order if b not in (0, 1)]
            for b in others:
                client.send(f"/brush/{b}/clear")
            for b in (0, 1):
                client.send(f"/brush/{b}/rect", 0.5 * b, 0.0, 0.5, 0.5)
            sent += 2 + len(others)
            wait_for(lambda: set(n.node.live().brushes) == {0, 1}, what="brushes 0 and 1")
        client.send(address, *args)
        sent += 1
    def handled() -> bool:
        stats = n.server.stats()
        return stats["accepted"] + stats["deduped"] + stats["rejected"] >= sent

    wait_for(handled)
    stats = n.server.stats()
    assert stats["rejected"] == 0, [args for a, args in client.poll() if a.endswith("/error")]
    assert stats["accepted"] + stats["deduped"] == sent
    wait_for(lambda: n.node.live().brush_order == (1, 0), what="the example order in force")


def test_param_map_turns_typed_lists_into_arguments() -> None:
    params = control.ParamMap(json.loads((TD / "streamnode_params.json").read_text()), brushes=1)
    v = {"Tindex": "20, 35 45", "Promptblend": "a cat: in rain:0.7 | dog:0.3", "Seedblend": "", "Preset": "",
         "Pause": True, "B0rectx": 0.1, "B0recty": 0.2, "B0rectw": 0.3, "B0recth": 0.4}
    assert params.message("Tindex", v.__getitem__) == ("/t_index", [20, 35, 45])
    assert params.message("Promptblend", v.__getitem__) == ("/prompt_blend", ["a cat: in rain", 0.7, "dog", 0.3])
    assert params.message("Seedblend", v.__getitem__) is None
    assert params.message("Preset", v.__getitem__) is None  # no preset picked yet
    assert params.message("Pause", v.__getitem__) == ("/pause", [1])
    assert params.message("B0recth", v.__getitem__) == ("/brush/0/rect", [0.1, 0.2, 0.3, 0.4])
    assert params.message("Nosuchpar", v.__getitem__) is None


# -- the extension class with a stand-in COMP --------------------------------------------------------


class FakeTable:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def clear(self) -> None:
        self.rows = []

    def appendRow(self, row: list[str]) -> None:
        self.rows.append(list(row))


class FakePar:
    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, value

    def eval(self) -> Any:
        return self.value


class FakeComp:
    def __init__(self, pars: dict[str, Any], ops: dict[str, Any]) -> None:
        self.par = types.SimpleNamespace(**{k: FakePar(k, v) for k, v in pars.items()})
        self._ops = ops

    def op(self, name: str) -> Any:
        return self._ops.get(name)


def test_extension_sends_parameters_and_fills_the_status_table(live: tuple[LiveNode, Any]) -> None:
    n, client = live
    reply_port = client.port
    client.close()  # the extension opens its own socket on the reply port
    table = FakeTable()
    params_dat = types.SimpleNamespace(text=(TD / "streamnode_params.json").read_text())
    comp = FakeComp({"Nodehost": "127.0.0.1", "Nodeport": n.server.port, "Replyport": reply_port, "Prefix": "",
                     "Guidance": 2.25, "Tindex": "10 40"},
                    {"status": table, "streamnode_params": params_dat})
    ext = control.StreamnodeControl(comp)
    try:
        assert ext.client.port == reply_port and not ext.client.listen_error
        comp.par.Tindex.value = "10 forty"
        ext.OnParChange(comp.par.Tindex)  # typed wrong: reported, nothing sent, nothing raised
        assert "Tindex" in ext.board.values["error"]
        comp.par.Tindex.value = "10 40"
        ext.OnParChange(comp.par.Guidance)
        ext.OnParChange(comp.par.Tindex)
        assert ext.SetPrompt("a neon city") and ext.SetSeed(99) and ext.Pause(False)

        def shown() -> bool:
            ext.Poll()
            rows = dict(tuple(r) for r in table.rows)
            # The full status reply to the extension's hello may come before the echoes: wait for them.
            return rows.get("connected") == "1" and rows.get("applied/seed") == "99" and \
                rows.get("applied/t_index") == "10 40" and rows.get("applied/guidance") == "2.25"

        wait_for(shown)
        rows = dict(tuple(r) for r in table.rows)
        assert rows["applied/guidance"] == "2.25" and rows["applied/t_index"] == "10 40"
        assert rows["applied/prompt"] == "a neon city" and rows["state"] == "streaming"
        assert n.server.stats()["rejected"] == 0
    finally:
        ext.client.close()


class FakePage:
    """A custom page: append<Style>(name, label=...) creates the parameter on the COMP."""

    def __init__(self, comp: FakeBuildComp, name: str) -> None:
        self.comp, self.name = comp, name
        self.styles: dict[str, str] = {}

    def __getattr__(self, attr: str) -> Any:
        if not attr.startswith("append"):
            raise AttributeError(attr)
        style = attr[len("append"):]

        def append(name: str, label: str = "") -> list[Any]:
            assert re.fullmatch(r"[A-Z][a-z0-9]*", name), name
            assert style in ("Str", "StrMenu", "Float", "Int", "Toggle", "Pulse", "File"), style
            par = types.SimpleNamespace(name=name, label=label, val=None, eval=lambda: par.val)
            setattr(self.comp.par, name, par)
            self.styles[name] = style
            return [par]

        return append


class FakeBuildComp(FakeComp):
    def __init__(self, ops: dict[str, Any]) -> None:
        super().__init__({}, ops)
        self.customPages: list[FakePage] = []

    def appendCustomPage(self, name: str) -> FakePage:
        page = FakePage(self, name)
        self.customPages.append(page)
        return page


def test_build_page_creates_every_parameter_with_its_range(monkeypatch: pytest.MonkeyPatch) -> None:
    class AnyPortClient(control.NodeClient):  # never bind the real 7001 in a test
        def __init__(self, host: str, port: int, reply_port: int, **kw: Any) -> None:
            super().__init__(host, port, 0, **kw)

    monkeypatch.setattr(control, "NodeClient", AnyPortClient)
    params_dat = types.SimpleNamespace(text=(TD / "streamnode_params.json").read_text())
    comp = FakeBuildComp({"streamnode_params": params_dat, "status": FakeTable()})
    ext = control.StreamnodeControl(comp)
    try:
        ext.BuildPage(brushes=2)
        assert [p.name for p in comp.customPages] == ["Streamnode", "Brush 0", "Brush 1", "Connection"]
        g = comp.par.Guidance
        assert (g.min, g.max, g.normMin, g.normMax, g.val) == (0.0, 20.0, 0.0, 20.0, 1.2)
        assert comp.customPages[0].styles["Pause"] == "Toggle" and comp.par.Pause.val is False
        assert "sd-turbo" in comp.par.Preset.menuNames
        assert comp.par.Nodeport.val == 7000 and comp.par.Replyport.val == 7001
        assert comp.customPages[2].styles["B1mask"] == "File"
        assert "/guidance f" in g.help
        comp.par.Guidance.val = 5.0
        ext.BuildPage(brushes=2)  # again: existing parameters keep their values
        assert comp.par.Guidance.val == 5.0 and len(comp.customPages) == 4
    finally:
        ext.client.close()
