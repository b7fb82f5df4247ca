"""MIDI and Art-Net in: synthetic MIDI messages through the mapper (no MIDI system needed),
real Art-Net packets over UDP on 127.0.0.1, malformed ones included; both end on the node's
ControlQueue as the same checked updates OSC makes."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace as Msg
from typing import Any

import pytest
from support import wait_for

from streamnode.config import ArtNetConfig
from streamnode.control.artnet import ArtNetMapper, ArtNetReceiver, artdmx, parse
from streamnode.control.midi import MidiMapper, load_mapping
from streamnode.control.updates import ControlQueue
from streamnode.live_params import LiveState, NodeParams

LIMITS = {"brush": 4, "lora": 4, "lfo": 4, "cues": 4}


def mapping_file(folder: Path, *entries: tuple[Any, ...]) -> Path:
    """A MIDI mapping file of (kind, number, address[, extra fields]) on channel 1."""
    mappings = [{"kind": kind, "channel": 1, "number": number, "address": address, **(extra[0] if extra else {})}
                for kind, number, address, *extra in entries]
    path = folder / "map.json"
    path.write_text(json.dumps({"mappings": mappings}))
    return path


def cc(channel: int, control: int, value: int) -> Msg:
    return Msg(type="control_change", channel=channel - 1, control=control, value=value)


def test_midi_learn_maps_the_next_knob_and_the_mapping_survives_a_restart(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "midi-map.json"
    queue = ControlQueue()
    live = {"state": LiveState(node=NodeParams(midi_learn="/guidance"))}
    mapper = MidiMapper(queue, LIMITS, path, live=lambda: live["state"])
    mapper.handle(cc(2, 21, 64))
    assert [(u.key, u.value) for u in queue.drain()] == [("midi_learn", "")], "learning ends learn mode"
    live["state"] = LiveState()  # the engine applied the end of learn mode
    mapper.handle(cc(2, 21, 127))
    mapper.handle(cc(2, 22, 127))  # not mapped: nothing
    assert [(u.key, u.value) for u in queue.drain()] == [("guidance_scale", 20.0)]
    # A new node (a restart) reads the file: the knob still drives guidance.
    restarted = MidiMapper(queue, LIMITS, path, live=LiveState)
    assert [b.address for b in load_mapping(path, LIMITS)] == ["/guidance"]
    restarted.handle(cc(2, 21, 0))
    assert [(u.key, u.value) for u in queue.drain()] == [("guidance_scale", 0.0)]


def test_midi_notes_drive_switches_triggers_and_a_storm_is_one_update_per_parameter(tmp_path) -> None:  # noqa: ANN001
    path = mapping_file(tmp_path, ("note", 36, "/cue_next"), ("note", 37, "/pause"),
                        ("cc", 1, "/lora/2/weight", {"low": 0, "high": 1}))
    queue = ControlQueue()
    mapper = MidiMapper(queue, LIMITS, path)
    mapper.handle(Msg(type="note_on", channel=0, note=36, velocity=100))
    mapper.handle(Msg(type="note_on", channel=0, note=36, velocity=90))  # still held: no second fire
    mapper.handle(Msg(type="note_on", channel=0, note=37, velocity=100))
    for v in range(128):  # a knob swept fast: many messages, one pending value
        mapper.handle(cc(1, 1, v))
    updates = {u.slot: u.value for u in queue.drain()}
    assert updates == {"cue_next": (None, None, None), "pause": True, "lora/2/weight": (2, "weight", 1.0)}
    bad = tmp_path / "bad.json"
    bad.write_text('{"mappings": [{"kind": "cc", "channel": 1, "number": 1, "address": "/prompt"}]}')
    with pytest.raises(ValueError, match="entry 0.*a fader can drive a number"):
        MidiMapper(queue, LIMITS, bad)


def test_what_a_port_delivers_together_maps_each_faders_newest_value_and_every_note_and_trigger(tmp_path) -> None:  # noqa: ANN001
    path = mapping_file(tmp_path, ("cc", 1, "/guidance"), ("cc", 2, "/cue_next"), ("note", 36, "/cue_next"))
    queue = ControlQueue()
    reports: list[tuple[str, object]] = []
    queue.put = lambda u: reports.append((u.slot, u.value))  # type: ignore[method-assign]  # every put, in order
    mapper = MidiMapper(queue, LIMITS, path)
    sweep = [cc(1, 1, v) for v in range(0, 128, 8)]
    # A trigger CC pressed twice, a pad hit and released, between two parts of a fader sweep.
    pads = [cc(1, 2, 127), cc(1, 2, 0), cc(1, 2, 127), Msg(type="note_on", channel=0, note=36, velocity=90),
            Msg(type="note_off", channel=0, note=36, velocity=0)]
    mapper.handle_pending(sweep[:8] + pads + sweep[8:])
    guidance = [v for slot, v in reports if slot == "guidance_scale"]
    assert guidance == [pytest.approx(20.0 * 120 / 127, abs=1e-4)], "of a fader's values read together, only the newest is mapped"
    assert [slot for slot, _ in reports].count("cue_next") == 3, "each rising edge of a trigger fires"
    assert mapper.handled == 4
    # In learn mode nothing is dropped: the first knob that moves is the one learned.
    learning = MidiMapper(ControlQueue(), LIMITS, tmp_path / "learn.json",
                          live=lambda: LiveState(node=NodeParams(midi_learn="/strength")))
    learning.handle_pending([cc(3, 7, 0), cc(3, 7, 90), cc(3, 7, 0)])
    assert [(b.kind, b.channel, b.number) for b in learning.bindings()] == [("cc", 3, 7)]


def test_a_missing_or_unplugged_midi_device_is_logged_once_and_retried(caplog) -> None:  # noqa: ANN001
    pytest.importorskip("mido", reason="pip install 'streamnode[tempo]'")
    from streamnode.tempo import midi_ports

    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="streamnode.tempo.midi_ports")
    thread = threading.Thread(target=midi_ports.read_port, args=("no such device", stop, lambda m: None))
    thread.start()
    wait_for(lambda: caplog.records, 5.0, "the first failure logged")
    stop.wait(1.8)  # several retries
    stop.set()
    thread.join(5.0)
    assert not thread.is_alive()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no such device" in lines[0] and "the node plays on" in lines[0]


@pytest.fixture()
def artnet():  # noqa: ANN201
    config = ArtNetConfig(enabled=True, host="127.0.0.1", port=0, universe=3, start_channel=10, channels=[
        {"channel": 1, "address": "/guidance"},
        {"channel": 2, "address": "/strength", "bits": 16},
        {"channel": 4, "address": "/brush/1/strength", "low": 0.2, "high": 0.4},
    ])
    queue = ControlQueue()
    receiver = ArtNetReceiver(ArtNetMapper.from_config(queue, config, LIMITS), config.host, config.port)
    receiver.open()
    stop = threading.Event()
    thread = threading.Thread(target=receiver.run, args=(stop,))
    thread.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield receiver, queue, lambda data: sock.sendto(data, ("127.0.0.1", receiver.port))
    stop.set()
    thread.join(2.0)
    receiver.close()
    sock.close()


def test_artdmx_over_udp_drives_8_and_16_bit_channels_in_their_ranges(artnet) -> None:  # noqa: ANN001
    receiver, queue, send = artnet
    data = bytearray(512)
    data[9], data[10], data[11], data[12] = 255, 0x80, 0x00, 0  # channel 10 full; 11+12 = 32768; 13 = 0
    send(artdmx(5, bytes(data)))  # another universe: ignored
    send(artdmx(3, bytes(data)))
    wait_for(lambda: len(queue) == 3, 5.0, "three updates")
    got = {u.slot: u.value for u in queue.drain()}
    assert got["guidance_scale"] == pytest.approx(20.0)
    assert got["strength"] == pytest.approx(32768 / 65535, abs=1e-6)
    assert got["brush/1/mask_strength"] == (1, "mask_strength", pytest.approx(0.2))
    send(artdmx(3, bytes(data)))  # unchanged levels: nothing downstream
    wait_for(lambda: receiver.mapper.packets == 2, 5.0, "the repeat read")
    assert len(queue) == 0
    data[9] = 0
    send(artdmx(3, bytes(data), sequence=200))
    wait_for(lambda: len(queue) == 1, 5.0, "the numbered packet")
    assert [u.value for u in queue.drain()] == [0.0]
    data[9] = 100
    send(artdmx(3, bytes(data), sequence=199))  # overtaken on the way: older levels
    send(artdmx(3, bytes(data), sequence=3))  # 200 → 255 → 3: newer, after the wrap
    wait_for(lambda: receiver.mapper.packets == 4, 5.0, "the newer packet")
    assert receiver.mapper.stale == 1
    assert [u.value for u in queue.drain()] == [pytest.approx(20.0 * 100 / 255)]


def test_malformed_artnet_packets_are_logged_once_and_the_receiver_goes_on(artnet, caplog) -> None:  # noqa: ANN001
    receiver, queue, send = artnet
    caplog.set_level(logging.WARNING, logger="streamnode.control.artnet")
    good = artdmx(3, bytes([0] * 9 + [128] + [0] * 6))  # DMX channel 10 (mapping channel 1) at 128
    for bad in (b"garbage", good[:14], good[:16] + b"\x02\x00" + good[18:], good[:-4] + b"", b"Art-Net\x00\x00\x50"):
        for _ in range(3):
            send(bad)
    send(good)
    wait_for(lambda: len(queue) == 3, 5.0, "the good packet after the bad ones")
    assert {u.key: u.value for u in queue.drain()}["guidance_scale"] == pytest.approx(20.0 * 128 / 255)
    assert receiver.mapper.malformed == 15
    causes = [r.getMessage() for r in caplog.records]
    assert 1 <= len(causes) <= 5, causes  # one line per cause, not per packet
    assert parse(artdmx(3, b"\x01\x02"), ).data == b"\x01\x02"


def test_a_node_whose_midi_devices_are_missing_streams_and_says_so_once(caplog) -> None:  # noqa: ANN001
    pytest.importorskip("mido", reason="pip install 'streamnode[tempo]'")
    from support import small_config

    from streamnode.node import Node

    caplog.set_level(logging.WARNING, logger="streamnode.tempo.midi_ports")
    config = small_config(**{"runtime.engine": "passthrough", "tempo.source": "midi",
                             "tempo.midi_clock_port": "no clock here", "midi.port": "no knobs here",
                             "midi.mapping": "/nonexistent/midi-map.json"})
    node = Node(config)
    node.start()
    try:
        wait_for(lambda: node.frames_out > 10, 10.0, "frames")
        wait_for(lambda: len(caplog.records) >= 2, 5.0, "both ports' failures")
        frames = node.frames_out
        wait_for(lambda: node.frames_out > frames + 10, 5.0, "frames still flowing")
        status = node.status()
        assert status["state"] == "streaming" and status["tempo"]["source"] == "midi"
    finally:
        node.stop()
    assert not node.busy_threads(), "the MIDI readers end with the node"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and any("no clock here" in m for m in lines) and any("no knobs here" in m for m in lines)


def test_a_midi_device_unplugged_while_playing_is_logged_once_and_picked_up_again(monkeypatch, caplog) -> None:  # noqa: ANN001
    """mido is replaced by a stand-in whose device list changes, as a real one does when a cable
    is pulled: what is tested is how the reader notices and recovers."""
    from streamnode.tempo import midi_ports

    class Port:
        def __init__(self) -> None:
            self.pending = [Msg(type="control_change", channel=0, control=1, value=5)]

        def iter_pending(self):  # noqa: ANN202
            out, self.pending = self.pending, []
            return out

        def close(self) -> None:
            pass

    plugged = {"value": True}
    opened: list[Port] = []

    class Mido:
        @staticmethod
        def get_input_names() -> list[str]:
            return ["nanoKONTROL2 MIDI 1"] if plugged["value"] else []

        @staticmethod
        def open_input(name: str) -> Port:
            opened.append(Port())
            return opened[-1]

    monkeypatch.setattr(midi_ports, "_mido", lambda: Mido)
    monkeypatch.setattr(midi_ports, "_PRESENT_CHECK_S", 0.05)
    monkeypatch.setattr(midi_ports, "_BACKOFF_S", (0.05,))
    caplog.set_level(logging.INFO, logger="streamnode.tempo.midi_ports")
    got: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(target=midi_ports.read_port, args=("nanokontrol", stop, got.extend))
    thread.start()
    try:
        wait_for(lambda: len(got) == 1, 5.0, "the first message")
        plugged["value"] = False
        wait_for(lambda: any("unavailable" in r.getMessage() for r in caplog.records), 5.0, "the unplug noticed")
        time.sleep(0.3)  # several retries while it is away
        plugged["value"] = True
        wait_for(lambda: len(got) == 2, 5.0, "messages again after the replug")
    finally:
        stop.set()
        thread.join(5.0)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in lines) == 1 and sum("is back" in m for m in lines) == 1, lines
