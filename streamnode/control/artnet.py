"""Art-Net in: a lighting desk's DMX over UDP drives live parameters.

Only ArtDmx packets (opcode 0x5000) for the configured port-address are read; everything else
on the port (ArtPoll, other universes) is ignored, and a malformed packet (short, a bad header,
a length beyond the data) is logged once per cause and dropped, never the loop. The parser is
our own, about thirty lines: a receiver is all the node needs, and the packet is fixed
(Art-Net 4, "ArtDmx"). pyartnet is for sending DMX; stupidartnet's receiver
(StupidArtnetServer) listens on every interface from a bare `_thread` that cannot be joined,
checks the 12-byte header but not the length field, and drops what fails without a word, where
the node must choose its interface, stop its threads in order and say why it ignored a desk
(docs/tempo.md).

A numbered packet (Art-Net's sequence, 1..255) older than the last one read arrived late
and is dropped, as the spec asks: its levels would step the parameter back.

Channels map to addresses (config `artnet.channels`): 8-bit (0..255) or 16-bit (coarse, then
fine: 0..65535) across the parameter's range or a `low..high` of its own. A channel is sent
on only when its value changed since the last packet, and the updates go on the node's
ControlQueue (latest wins per parameter), so a desk sending 44 packets a second of unchanged
levels costs one parse each and nothing downstream.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from dataclasses import dataclass

from streamnode.config import ArtNetConfig
from streamnode.control.mapping import Target
from streamnode.control.osc import Limits, OscReject
from streamnode.control.updates import ControlQueue
from streamnode.log_limit import LogLimiter, held_text

logger = logging.getLogger(__name__)

ARTNET_ID = b"Art-Net\x00"
OP_DMX = 0x5000
_HEADER = struct.Struct("<8sHBBBBHH")  # id, opcode (LE), protver hi, lo, sequence, physical, port-address (LE), length (BE, fixed below)
_RECV_TICK_S = 0.1
_COALESCE_S = 0.015  # under a desk's packet interval (44 a second: 23 ms) and a 60 fps frame


class ArtNetError(ValueError):
    """A packet that is not a well-formed ArtDmx."""


@dataclass(frozen=True, slots=True)
class ArtDmx:
    universe: int  # the 15-bit port-address: net (7 bits), sub-net (4), universe (4)
    sequence: int
    data: bytes


def parse(packet: bytes) -> ArtDmx | None:
    """An ArtDmx packet → its universe and channel data; None for another Art-Net opcode;
    ArtNetError for anything malformed."""
    if len(packet) < 10 or packet[:8] != ARTNET_ID:
        raise ArtNetError(f"not Art-Net ({len(packet)} bytes, no 'Art-Net' header)")
    opcode = int.from_bytes(packet[8:10], "little")
    if opcode != OP_DMX:
        return None
    if len(packet) < 18:
        raise ArtNetError(f"ArtDmx too short: {len(packet)} bytes, the header alone is 18")
    version = int.from_bytes(packet[10:12], "big")
    if version < 14:
        raise ArtNetError(f"ArtDmx protocol version {version}: 14 or later expected")
    universe = int.from_bytes(packet[14:16], "little") & 0x7FFF
    length = int.from_bytes(packet[16:18], "big")
    if not 2 <= length <= 512 or length % 2:
        raise ArtNetError(f"ArtDmx length {length}: must be even, 2..512")
    if len(packet) < 18 + length:
        raise ArtNetError(f"ArtDmx says {length} channels, carries {len(packet) - 18}")
    return ArtDmx(universe, packet[12], bytes(packet[18 : 18 + length]))


def artdmx(universe: int, data: bytes, sequence: int = 0) -> bytes:
    """Build an ArtDmx packet (tests, benchmarks, a loopback check)."""
    if len(data) % 2:
        data += b"\x00"
    return ARTNET_ID + struct.pack("<H", OP_DMX) + bytes([0, 14, sequence & 0xFF, 0]) + struct.pack(
        "<H", universe) + struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class Channel:
    offset: int  # 0-based index into the packet's data
    bits: int
    target: Target

    def fraction(self, data: bytes) -> float | None:
        end = self.offset + (2 if self.bits == 16 else 1)
        if end > len(data):
            return None
        if self.bits == 16:
            return ((data[self.offset] << 8) | data[self.offset + 1]) / 65535.0
        return data[self.offset] / 255.0


class ArtNetMapper:
    """ArtDmx data → updates on the queue. `handle` on the receiver thread only."""

    def __init__(self, queue: ControlQueue, universe: int, channels: list[Channel]) -> None:
        self.queue = queue
        self.universe = universe
        self.channels = channels
        self._last: dict[int, float] = {}
        self._sequence = 0
        self._log_limit = LogLimiter()
        self.packets = self.malformed = self.handled = self.stale = 0

    @classmethod
    def from_config(cls, queue: ControlQueue, cfg: ArtNetConfig, limits: Limits) -> ArtNetMapper:
        """The mapper `artnet` in the config asks for; ValueError naming a channel that cannot be."""
        channels = []
        for entry in cfg.channels:
            offset = cfg.start_channel - 1 + entry.channel - 1
            if offset + (2 if entry.bits == 16 else 1) > 512:
                raise ValueError(f"artnet channel {entry.channel} ({entry.address}) lies beyond DMX channel 512")
            try:
                target = Target.of(entry.address, limits, entry.low, entry.high)
            except ValueError as e:
                raise ValueError(f"artnet channel {entry.channel}: {e}") from None
            channels.append(Channel(offset, entry.bits, target))
        return cls(queue, cfg.universe, channels)

    def handle(self, packet: bytes, host: str = "") -> None:
        """One packet: checked, then its levels mapped."""
        dmx = self.accept(packet, host)
        if dmx is not None:
            self.apply(dmx)

    def accept(self, packet: bytes, host: str = "") -> ArtDmx | None:
        """The packet's ArtDmx when it is well formed, for our universe and not overtaken; else
        None (a malformed one logged once per reason and sender)."""
        try:
            dmx = parse(packet)
        except ArtNetError as e:
            self.malformed += 1
            if (held := self._log_limit(f"artnet:{host}:{str(e)[:24]}")) is not None:
                logger.warning("Art-Net: dropped a packet from %s: %s%s", host or "?", e, held_text(held))
            return None
        if dmx is None or dmx.universe != self.universe:
            return None
        if dmx.sequence:  # 0: the sender does not number its packets
            behind = (self._sequence - dmx.sequence) % 256
            if self._sequence and 0 < behind < 128:
                self.stale += 1  # overtaken on the way (UDP reorders): its levels are older
                return None
            self._sequence = dmx.sequence
        self.packets += 1
        return dmx

    def apply(self, dmx: ArtDmx) -> None:
        """A universe's levels → an update for each mapped channel that moved."""
        for channel in self.channels:
            fraction = channel.fraction(dmx.data)
            if fraction is None or self._last.get(channel.offset) == fraction:
                continue
            previous = self._last.get(channel.offset, 0.0)
            self._last[channel.offset] = fraction
            target = channel.target
            if target.param.kind == "trigger" and previous >= 0.5:
                continue
            try:
                update = target.update(fraction, origin=f"artnet:{target.address}")
            except OscReject as e:
                if (held := self._log_limit(f"artnet-value:{channel.offset}")) is not None:
                    logger.warning("Art-Net channel %d → %s: %s%s", channel.offset + 1, target.address, e,
                                   held_text(held))
                continue
            if update is not None:
                self.handled += 1
                self.queue.put(update)


class ArtNetReceiver:
    """The `artnet-recv` thread: a UDP socket bound at `open()`, packets to the mapper."""

    def __init__(self, mapper: ArtNetMapper, host: str, port: int) -> None:
        self.mapper = mapper
        self.host, self.port = host, port
        self._sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"Art-Net cannot listen on {self.host}:{self.port} ({e}); set artnet.port or "
                          "stop the other Art-Net receiver") from None
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])

    def run(self, stop: threading.Event) -> None:
        sock = self._sock
        assert sock is not None
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            while not stop.is_set():
                if not sel.select(_RECV_TICK_S):
                    continue
                newest = None
                for _ in range(256):
                    try:
                        data, (host, _port) = sock.recvfrom(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # an ICMP error on some systems: the next read is fine
                    newest = self.mapper.accept(data, host) or newest
                if newest is not None:
                    self.mapper.apply(newest)
                # An ArtDmx packet carries the whole universe, so of the packets that arrive
                # together only the newest counts: waiting a little before the next read maps one
                # packet per tick however fast the desks send. Every wake costs the engine thread
                # too (it waits for the interpreter meanwhile): at 500 packets a second this thread
                # used 5.5 % of a core with a 5 ms tick and 2.5 % with 20 ms; a desk at 44 a second
                # still gets each packet mapped on its own.
                stop.wait(_COALESCE_S)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
