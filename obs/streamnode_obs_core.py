"""What the OBS kit does, without OBS: talk OSC to a streamnode node and watch its heartbeat.

`streamnode_obs.py` (the script OBS loads) and `streamnode_watchdog.py` (the obs-websocket
fallback, run outside OBS) are thin shells around this module. It imports only the standard
library, so it runs in whatever Python OBS was pointed at, and the tests run it as it is.

- `encode_message` / `decode_packet`: a minimal OSC 1.0 codec (i, h, f, d, s, T, F, N).
- `NodeLink`: one UDP socket that sends to the node and receives its replies, never blocking.
- `NodeMonitor`: the node's heartbeat, state, fps, latency and applied values, and whether it
  is healthy.
- `Outbox`: OBS property values → OSC messages, on change only, text debounced, a preset
  before the values it would overwrite.
- `SceneFallback`: when to cut to a fallback scene, when to come back, when to stand aside.
- `FallbackSwitcher`: carries those decisions out on OBS and says what happened.
- `ObsWebsocketScenes`: scene switching over obs-websocket 5 (obsws-python, imported lazily).
- `Trouble`, `Settled`: one log line per problem; a setting that counts once typing stops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("streamnode_obs")

DEFAULT_NODE_PORT = 7000
DEFAULT_REPLY_PORT = 7001
HEARTBEAT_TIMEOUT_S = 3.0  # the node beats once a second: three missed beats means it is gone
HELLO_INTERVAL_S = 2.0
HEALTHY_STATES = frozenset({"streaming", "paused"})
"""States in which the node's output is worth showing (paused holds the last good frame)."""

RECENT_ERROR_S = 30.0  # how long the status line shows the last error

OSC_INT32 = (-(2**31), 2**31 - 1)


# -- the node's OSC addresses: the only place the kit names them (a rename is one edit here) ----

CONTROL_ADDRESSES = {
    "prompt": "/prompt",
    "negative_prompt": "/negative_prompt",
    "guidance": "/guidance",
    "strength": "/strength",
    "seed": "/seed",
    "preset": "/preset",
}
STATUS_REQUEST = "/status"
"""Asks for a full status reply, and registers us as a reply target."""
REPLY_ROOT = "/streamnode/"
"""The node's replies: heartbeat, state, fps, latency_ms, dropped, skipped, error, applied/<address>."""


# -- saying things once --------------------------------------------------------------------------


class Trouble:
    """One log line when a problem starts or its cause changes, one when it clears.

    The kit's checks run ten times a second; OBS being away, a wrong password or a missing
    scene must cost one line, not ten a second (and, inside OBS, one Script Log popup).
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.cause: str | None = None
        self._log = log or logger

    def report(self, cause: str, level: int = logging.WARNING, exc_info: bool = False) -> bool:
        """Log `cause` unless it is the one already reported; True if it was logged."""
        if cause == self.cause:
            return False
        self.cause = cause
        self._log.log(level, "streamnode: %s", cause, exc_info=exc_info)
        return True

    def clear(self, message: str) -> None:
        """The problem is gone: say `message` (at info), once."""
        if self.cause is not None:
            self.cause = None
            self._log.info("streamnode: %s", message)


class Settled:
    """A setting that takes effect once it has stopped changing for `delay_s`.

    OBS reports every keystroke: typing 7001 into a port field gives 7, 70, 700, 7001, and
    typing a scene name gives "B", "BR", "BRB". Acting on each would bind three wrong ports
    or warn about three missing scenes.
    """

    def __init__(self, value: Any, delay_s: float = 1.0) -> None:
        self.value = value
        self.delay_s = delay_s
        self._pending: tuple[Any, float] | None = None

    def offer(self, value: Any, now: float) -> None:
        if value == self.value:
            self._pending = None  # typed back to what is in effect: nothing to do
        elif self._pending is None or self._pending[0] != value:
            self._pending = (value, now)

    def take(self, now: float) -> bool:
        """True (and `value` updated) when a new value has settled."""
        if self._pending is None or now - self._pending[1] < self.delay_s:
            return False
        self.value, self._pending = self._pending[0], None
        return True


# -- OSC codec ---------------------------------------------------------------------------------


def _pad(data: bytes) -> bytes:
    return data + b"\x00" * (4 - len(data) % 4)  # OSC strings always end in 1..4 NULs


def _tagged(value: Any) -> tuple[str, bytes]:
    if isinstance(value, bool):
        return ("T" if value else "F"), b""
    if value is None:
        return "N", b""
    if isinstance(value, int):
        if OSC_INT32[0] <= value <= OSC_INT32[1]:
            return "i", struct.pack(">i", value)
        return "h", struct.pack(">q", value)  # seeds above 2**31-1 (the node takes h)
    if isinstance(value, float):
        return "f", struct.pack(">f", value)
    if isinstance(value, str):
        return "s", _pad(value.encode("utf-8"))
    raise TypeError(f"cannot send {type(value).__name__} {value!r:.40} over OSC (int, float, str, bool, None)")


def encode_message(address: str, args: Sequence[Any] = ()) -> bytes:
    """One OSC message. ints go as i (h when they do not fit 32 bits), floats as f, str as s."""
    if not address.startswith("/"):
        raise ValueError(f"an OSC address starts with '/': {address!r}")
    tags, data = ",", b""
    for value in args:
        tag, payload = _tagged(value)
        tags += tag
        data += payload
    return _pad(address.encode("utf-8")) + _pad(tags.encode("ascii")) + data


def _read_string(data: bytes, i: int) -> tuple[str, int]:
    end = data.index(b"\x00", i)
    return data[i:end].decode("utf-8"), (end // 4 + 1) * 4


def decode_message(data: bytes) -> tuple[str, list[Any]]:
    """OSC message bytes → (address, args). Raises ValueError on anything malformed."""
    try:
        address, i = _read_string(data, 0)
        if i >= len(data):
            return address, []
        tags, i = _read_string(data, i)
        if not tags.startswith(","):
            raise ValueError("type tags must start with ','")
        args: list[Any] = []
        for tag in tags[1:]:
            if tag == "i":
                args.append(struct.unpack_from(">i", data, i)[0])
                i += 4
            elif tag == "f":
                args.append(struct.unpack_from(">f", data, i)[0])
                i += 4
            elif tag == "h":
                args.append(struct.unpack_from(">q", data, i)[0])
                i += 8
            elif tag == "d":
                args.append(struct.unpack_from(">d", data, i)[0])
                i += 8
            elif tag == "s":
                text, i = _read_string(data, i)
                args.append(text)
            elif tag in "TFN":
                args.append({"T": True, "F": False, "N": None}[tag])
            else:
                raise ValueError(f"unsupported OSC type tag {tag!r}")
    except (struct.error, UnicodeDecodeError, ValueError) as e:  # ValueError: no NUL terminator
        raise ValueError(f"malformed OSC message: {e}") from None
    if not address.startswith("/"):
        raise ValueError("malformed OSC message: the address must start with '/'")
    return address, args


def decode_packet(data: bytes) -> list[tuple[str, list[Any]]]:
    """A datagram (message or bundle, nested bundles flattened) → its messages."""
    if not data.startswith(b"#bundle\x00"):
        return [decode_message(data)]
    out: list[tuple[str, list[Any]]] = []
    i = 16  # "#bundle\0" + 8-byte time tag
    while i + 4 <= len(data):
        size = struct.unpack_from(">i", data, i)[0]
        i += 4
        if size <= 0 or i + size > len(data):
            raise ValueError(f"malformed OSC bundle: element size {size}")
        out.extend(decode_packet(data[i : i + size]))
        i += size
    return out


# -- the socket --------------------------------------------------------------------------------


def listen_host_for(node_host: str) -> str:
    """Where to listen for replies: loopback when the node is on this machine, else everywhere
    (the node answers the address our messages came from, which we cannot pick from here)."""
    return "127.0.0.1" if node_host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"


class NodeLink:
    """Sends OSC to the node and reads its replies without ever blocking the caller.

    One socket does both: bound to the reply port (7001 unless the node runs with
    --osc-reply), so replies to "the sender's host, port 7001" land here. When that port is
    taken (another tool listens on it) the link still sends, and `listen_error` says why no
    status can arrive. `close()` is safe twice.
    """

    def __init__(self, node_host: str = "127.0.0.1", node_port: int = DEFAULT_NODE_PORT,
                 reply_port: int | None = DEFAULT_REPLY_PORT, listen_host: str | None = None) -> None:
        self.target = (node_host, node_port)
        self.listen_error: str | None = None
        self.send_errors = 0
        self._send_trouble = Trouble()
        self.bad_packets = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if hasattr(socket, "SIO_UDP_CONNRESET"):
            # Windows: without this, one reply that bounced off a closed port makes every
            # later recvfrom() fail with WSAECONNRESET.
            self._sock.ioctl(socket.SIO_UDP_CONNRESET, False)  # type: ignore[attr-defined]
        host = listen_host if listen_host is not None else listen_host_for(node_host)
        try:
            self._sock.bind((host, reply_port or 0))
        except OSError as e:
            self.listen_error = (f"cannot listen for the node's replies on {host}:{reply_port} ({e.strerror or e}); "
                                 "another program uses that port: close it, or start the node with "
                                 "--osc-reply HOST:PORT and set that port here")
            self._sock.close()
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind((host, 0))
        self._sock.setblocking(False)
        self._closed = False

    @property
    def port(self) -> int:
        """The local port replies arrive on."""
        return int(self._sock.getsockname()[1])

    def send(self, address: str, *args: Any) -> bool:
        """Send one message; False (and counted) when the OS refused it. Never raises for the network."""
        if self._closed:
            return False
        try:
            self._sock.sendto(encode_message(address, args), self.target)
        except OSError as e:  # no route, host unknown: the next change tries again
            self.send_errors += 1
            self._send_trouble.report(f"cannot send to the node at {self.target[0]}:{self.target[1]}: "
                                      f"{e.strerror or e}")
            return False
        self._send_trouble.clear(f"sending to the node at {self.target[0]}:{self.target[1]} works again")
        return True

    def poll(self, limit: int = 256) -> list[tuple[str, list[Any]]]:
        """Every message waiting on the socket (at most `limit` datagrams), oldest first."""
        messages: list[tuple[str, list[Any]]] = []
        for _ in range(limit):
            if self._closed:
                break
            try:
                data, _ = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:  # Windows: the ICMP echo of an earlier send; skip it
                continue
            except OSError:
                break
            try:
                messages.extend(decode_packet(data))
            except ValueError:
                self.bad_packets += 1
        return messages

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> NodeLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the node's status ---------------------------------------------------------------------------


@dataclass
class NodeMonitor:
    """What the node last said about itself, from its replies (addresses under `prefix`).

    `healthy(now)` is the fallback's question: a heartbeat within `timeout_s` and a state in
    `healthy_states`. Times are `time.monotonic()` seconds, passed in so tests need no sleep.
    """

    prefix: str = ""
    timeout_s: float = HEARTBEAT_TIMEOUT_S
    healthy_states: frozenset[str] = HEALTHY_STATES
    heartbeat: int | None = None
    last_beat: float | None = None
    state: str | None = None
    fps: float | None = None
    latency_ms: float | None = None
    dropped: int | None = None
    skipped: int | None = None
    error: str = ""
    """The last error the node sent (a rejected message, or its own failure); kept until replaced."""
    error_at: float | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    applied_at: dict[str, float] = field(default_factory=dict)
    """When each address's applied echo last arrived (the outbox waits for the preset's)."""
    last_applied: tuple[str, Any] | None = None
    """The most recent applied echo, (address, value)."""
    connects: int = 0
    """Times the heartbeat started after silence (or for the first time), or started counting
    again from the beginning: a (re)started node."""
    last_message: float | None = None

    def on_message(self, address: str, args: Sequence[Any], now: float) -> bool:
        """Take one reply; False when it is not one of the node's (another prefix, unknown)."""
        base = self.prefix + REPLY_ROOT
        if not address.startswith(base):
            return False
        name = address[len(base):]
        value = args[0] if len(args) == 1 else list(args)
        if self.last_message is not None and now - self.last_message > self.timeout_s:
            self._forget_node(keep_state=False)  # silent a while: whoever answers now starts afresh
        self.last_message = now
        if name == "heartbeat" and isinstance(value, int):
            if not self.alive(now):
                self.connects += 1
            elif self.heartbeat is not None and value < self.heartbeat:
                # Restarted faster than the timeout: the new node counts from 1. Its state
                # came just before this beat; what the old one measured must go.
                self.connects += 1
                self._forget_node(keep_state=True)
            self.heartbeat, self.last_beat = value, now
        elif name == "state" and isinstance(value, str):
            self.state = value
        elif name in ("fps", "latency_ms") and isinstance(value, (int, float)):
            setattr(self, name, float(value))
        elif name in ("dropped", "skipped") and isinstance(value, (int, float)):
            setattr(self, name, int(value))
        elif name == "error" and isinstance(value, str):
            if value:  # a full status reply carries "" for "no error now": keep the last one
                self.error, self.error_at = value, now
        elif name.startswith("applied/"):
            local = "/" + name[len("applied/"):]
            self.applied[local] = value
            self.applied_at[local] = now
            self.last_applied = (local, value)
        else:
            return False
        return True

    def _forget_node(self, *, keep_state: bool) -> None:
        """Drop what a previous node run reported (its last error stays: it says why it went)."""
        self.fps = self.latency_ms = self.dropped = self.skipped = None
        self.applied.clear()
        self.last_applied = None
        if not keep_state:
            self.state = None

    def alive(self, now: float) -> bool:
        return self.last_beat is not None and now - self.last_beat <= self.timeout_s

    def healthy(self, now: float) -> bool:
        return self.alive(now) and self.state in self.healthy_states

    def condition(self, now: float) -> str:
        """What the node is doing, in words that change only when that does (for the log; the
        label's `summary` counts the seconds of silence)."""
        if self.last_beat is None:
            return "no reply from the node yet"
        if not self.alive(now):
            return f"node silent (no heartbeat for {self.timeout_s:g} s; last state: {self.state or 'unknown'})"
        return f"node {self.state or 'alive'}"

    def summary(self, now: float) -> str:
        """One line for a status label: "streaming · 14.8 fps · 62 ms" or why there is nothing."""
        if self.last_beat is None:
            return "no reply from the node yet"
        if not self.alive(now):
            return f"node silent for {now - self.last_beat:.0f} s (last state: {self.state or 'unknown'})"
        parts = [self.state or "alive"]
        if self.fps is not None:
            parts.append(f"{self.fps:.1f} fps")
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:.0f} ms")
        if self.dropped:
            parts.append(f"{self.dropped} dropped")
        text = " · ".join(parts)
        recent = self.error_at is not None and now - self.error_at <= RECENT_ERROR_S
        return f"{text} · last error: {self.error}" if recent else text


class NodeSession:
    """A link and a monitor together, plus the "hello" that keeps replies coming.

    The node replies only to hosts that have sent it something since it started (unless it
    runs with --osc-reply). So while the node is silent we send `/status` every
    `hello_interval_s`: that registers us again after a node restart, and asks for a full
    status reply straight away.
    """

    def __init__(self, link: NodeLink, monitor: NodeMonitor | None = None, prefix: str = "",
                 hello_interval_s: float = HELLO_INTERVAL_S) -> None:
        self.link = link
        self.prefix = prefix
        self.monitor = monitor if monitor is not None else NodeMonitor(prefix=prefix)
        self.hello_interval_s = hello_interval_s
        self._last_hello: float | None = None

    def send(self, address: str, *args: Any) -> bool:
        return self.link.send(self.prefix + address, *args)

    def tick(self, now: float | None = None) -> int:
        """Read the replies; say hello if the node is silent. Returns how many replies were the node's."""
        t = time.monotonic() if now is None else now
        count = sum(self.monitor.on_message(address, args, t) for address, args in self.link.poll())
        if not self.monitor.alive(t) and (self._last_hello is None or t - self._last_hello >= self.hello_interval_s):
            self._last_hello = t
            self.send(STATUS_REQUEST)
        return count

    def close(self) -> None:
        self.link.close()


# -- OBS properties → OSC ------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One OBS script property and the node address it drives.

    Ranges mirror the node's OSC table (streamnode.control.osc.ADDRESSES); a test keeps them
    equal. OBS integer properties are C ints, so the seed stops at 2**31-1 here.
    """

    key: str
    address: str
    kind: str  # "text", "float", "int", "choice"
    label: str
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    max_len: int | None = None

    def convert(self, value: Any) -> Any:
        """An OBS setting value → the OSC argument, or ValueError with what is wrong."""
        if self.kind in ("text", "choice"):
            text = str(value)
            if self.max_len is not None and len(text) > self.max_len:
                raise ValueError(f"{self.label}: {len(text)} characters, at most {self.max_len}")
            return text
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{self.label}: {value!r} is not a number")
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            raise ValueError(f"{self.label}: {value} is outside {self.min:g}..{self.max:g}")
        return int(round(number)) if self.kind == "int" else number


SHIPPED_PRESETS = ("sd-turbo", "lcm-sd15", "txt2img-turbo", "demo")
"""Offered in the preset list (it also takes any typed name); a test checks presets/ has them."""

CONTROLS: tuple[Control, ...] = (
    Control("prompt", CONTROL_ADDRESSES["prompt"], "text", "Prompt", "", max_len=4096),
    Control("negative_prompt", CONTROL_ADDRESSES["negative_prompt"], "text", "Negative prompt", "", max_len=4096),
    Control("guidance", CONTROL_ADDRESSES["guidance"], "float", "Guidance", 1.2, 0.0, 20.0, 0.05),
    Control("strength", CONTROL_ADDRESSES["strength"], "float", "Strength", 0.5, 0.0, 1.0, 0.01),
    Control("seed", CONTROL_ADDRESSES["seed"], "int", "Seed", 2, 0, 2**31 - 1, 1),
    Control("preset", CONTROL_ADDRESSES["preset"], "choice", "Preset", "", max_len=64),
)
"""What the OBS script shows, in order."""

PRESET_WAIT_S = 2.0
"""Longest the other values wait for the node to say it applied a preset."""


class Outbox:
    """Turns property values into OSC messages: only what changed, text after a pause.

    OBS calls `script_update` on every keystroke in a text box; a prompt sent per keystroke
    would make the node encode "a", "a c", "a ca"… Numbers go out at once (a slider should
    feel live); text and preset names wait until they have not changed for `text_delay_s`.
    An empty preset name means "none chosen" and is never sent.

    A preset replaces the node's prompt, guidance and the rest, so it goes first and alone:
    the values due with it wait until the node echoes that it applied the preset (at most
    `preset_wait_s`). Sent in the same burst they would be lost, not just overwritten: the
    node drops a value equal to the one it last accepted, and it forgets those only once the
    preset is applied. When the node's latest echo is that very preset, the node drops the
    repeat (nothing changed since it loaded it) and no echo will come: no wait then.
    """

    def __init__(self, controls: Iterable[Control] = CONTROLS, text_delay_s: float = 0.5,
                 preset_wait_s: float = PRESET_WAIT_S) -> None:
        self.controls = {c.key: c for c in controls}
        self.text_delay_s = text_delay_s
        self.preset_wait_s = preset_wait_s
        # Presets first: each replaces several of the others.
        self._order = sorted(self.controls.values(), key=lambda c: c.kind != "choice")
        self._preset: tuple[str, float] | None = None  # (address, when sent) while the rest waits
        self._sent: dict[str, Any] = {}
        self._pending: dict[str, tuple[Any, float]] = {}  # key → (value, when it last changed)
        self.errors: dict[str, str] = {}

    def baseline(self, values: dict[str, Any]) -> None:
        """Record values as already on the node (script load), so they are not sent."""
        for key, value in values.items():
            control = self.controls.get(key)
            if control is not None:
                try:
                    self._sent[key] = control.convert(value)
                except ValueError:
                    continue

    def update(self, values: dict[str, Any], now: float) -> None:
        """New property values (all or some). Changed ones become pending."""
        for key, raw in values.items():
            control = self.controls.get(key)
            if control is None:
                continue
            try:
                value = control.convert(raw)
            except ValueError as e:
                self.errors[key] = str(e)
                continue
            self.errors.pop(key, None)
            pending = self._pending.get(key)
            if pending is not None and pending[0] == value:
                continue  # unchanged since the last edit: keep its settle time
            if pending is None and key in self._sent and self._sent[key] == value:
                continue
            self._pending[key] = (value, now)

    def resend_all(self, values: dict[str, Any], now: float) -> None:
        """Make every value pending again (e.g. the node restarted), except empty text: an empty
        prompt box should not wipe the prompt the node's preset brought."""
        self._sent.clear()
        self._pending.clear()
        self.update({k: v for k, v in values.items() if v != ""}, now - self.text_delay_s)

    def due(self, now: float, node: NodeMonitor | None = None) -> list[tuple[str, list[Any]]]:
        """Messages to send now, a preset first and alone; marks them sent. `node` tells when
        the node applied the preset."""
        if self._preset is not None:
            address, sent_at = self._preset
            echoed = node is not None and node.applied_at.get(address, -math.inf) > sent_at
            if not echoed and now - sent_at < self.preset_wait_s:
                return []
            self._preset = None
        out = []
        for control in self._order:
            pending = self._pending.get(control.key)
            if pending is None:
                continue
            value, since = pending
            if control.kind in ("text", "choice") and now - since < self.text_delay_s:
                continue
            del self._pending[control.key]
            if control.kind == "choice" and value == "":
                continue
            self._sent[control.key] = value
            out.append((control.address, [value]))
            if control.kind == "choice" and not (node is not None and node.last_applied == (control.address, value)):
                self._preset = (control.address, now)
                break
        return out


# -- scene fallback ------------------------------------------------------------------------------


class Scenes(Protocol):
    """What the fallback needs from OBS. `switch` raises LookupError for a scene OBS does not
    have; any call raises ObsUnavailable while OBS cannot be asked."""

    def current(self) -> str | None: ...

    def switch(self, name: str) -> None: ...

    def names(self) -> list[str]: ...


class ObsUnavailable(ConnectionError):
    """OBS cannot be asked right now: not running, unreachable, or it refused our password."""


class SceneFallback:
    """Cut to `fallback_scene` when the node stops being healthy; cut back when it recovers.

    - Armed only once the node has been healthy (so loading the script before starting the
      node does not change scenes), unless `arm_at_start`.
    - Back to the scene it replaced after `recover_s` of continuous health (`restore`).
    - The operator always wins: once they pick another scene while the fallback is up, it
      stands aside (`aside`) until the node has recovered, and then does not cut back. The
      next outage cuts again.
    - For `settle_s` after its own cut, OBS may still report the old scene (a transition is
      running, or OBS has not carried the switch out yet): that is not the operator.
    `step()` returns the scene to switch to, or None; the caller switches, and calls
    `switch_failed()` when it could not.
    """

    def __init__(self, fallback_scene: str, *, restore: bool = True, recover_s: float = 2.0,
                 arm_at_start: bool = False, settle_s: float = 1.0) -> None:
        self.fallback_scene = fallback_scene
        self.restore = restore
        self.recover_s = recover_s
        self.settle_s = settle_s
        self.armed = arm_at_start
        self.active = False  # the fallback scene is up because of us
        self.aside = False  # the operator took over during an outage
        self.replaced: str | None = None
        self._healthy_since: float | None = None
        self._cut_at = -math.inf

    def step(self, healthy: bool, now: float, current: str | None) -> str | None:
        if healthy:
            if self._healthy_since is None:
                self._healthy_since = now
        else:
            self._healthy_since = None
        recovered = self._healthy_since is not None and now - self._healthy_since >= self.recover_s
        if not self.fallback_scene:
            return None
        if self.aside:
            if recovered:
                self.aside = False  # watching again; the operator's scene stays
            return None
        if not self.active:
            if healthy:
                self.armed = True
                return None
            if not self.armed or current == self.fallback_scene:
                return None
            self.active, self.replaced, self._cut_at = True, current, now
            return self.fallback_scene
        if current is not None and current != self.fallback_scene:
            if now - self._cut_at < self.settle_s:
                return None  # our own cut may not show yet
            self.active, self.replaced, self.aside = False, None, True  # the operator moved on
            return None
        if recovered:
            self.active = False
            back, self.replaced = self.replaced, None
            return back if self.restore and back else None
        return None

    def switch_failed(self, target: str) -> None:
        """The switch `step` asked for did not happen; a failed cut is tried again next step."""
        if target == self.fallback_scene:
            self.active, self.replaced = False, None


def _scene_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"


class FallbackSwitcher:
    """Carries a `SceneFallback` out on OBS, and says what happens, one line per cause.

    Checks that OBS has the fallback scene on its first step (and every `recheck_s` while it
    does not), so a typo shows at once, with the scenes OBS does have, instead of when the
    node fails. Node lost / recovered are routine (info); OBS away, a wrong password and a
    missing scene are warnings, logged once each and once more when they clear.
    """

    def __init__(self, fallback: SceneFallback, scenes: Scenes, recheck_s: float = 5.0) -> None:
        self.fallback = fallback
        self.scenes = scenes
        self.recheck_s = recheck_s
        self.scene_found: bool | None = None  # None: not asked yet
        self.obs_trouble = Trouble()
        self.scene_trouble = Trouble()
        self._next_check = -math.inf

    def _check_scene(self) -> None:
        names = self.scenes.names()
        name = self.fallback.fallback_scene
        if name in names:
            if self.scene_found is None:
                logger.info("streamnode: fallback scene %r is ready (OBS's scenes: %s)", name, _scene_list(names))
            self.scene_trouble.clear(f"OBS has the fallback scene {name!r} now")
            self.scene_found = True
        else:
            self.scene_found = False
            self.scene_trouble.report(f"OBS has no scene named {name!r} to fall back to; its scenes: "
                                      f"{_scene_list(names)}. Pick one of them, or add that scene in OBS")

    def step(self, monitor: NodeMonitor, now: float) -> str | None:
        """One watchdog step: ask OBS, decide, switch. Returns the scene switched to, or None."""
        try:
            current = self.scenes.current()
            self.obs_trouble.clear("OBS answers now")
            if self.scene_found is not True and now >= self._next_check:
                self._next_check = now + self.recheck_s
                self._check_scene()
        except ObsUnavailable as e:
            self.obs_trouble.report(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - OBS misbehaving must not stop the watchdog
            self.obs_trouble.report(f"cannot ask OBS for its scenes: {type(e).__name__}: {e}")
            return None
        target = self.fallback.step(monitor.healthy(now), now, current)
        if target is None or target == current:
            return None
        if target == self.fallback.fallback_scene and self.scene_found is False:
            self.fallback.switch_failed(target)  # said already; the recheck finds it when it appears
            return None
        try:
            self.scenes.switch(target)
        except LookupError:
            self.fallback.switch_failed(target)
            if target == self.fallback.fallback_scene:
                self.scene_found = False
                self.scene_trouble.report(f"OBS has no scene named {target!r} to fall back to any more")
            else:
                logger.warning("streamnode: node recovered, but OBS has no scene %r to cut back to", target)
            return None
        except Exception as e:  # noqa: BLE001
            self.fallback.switch_failed(target)
            self.obs_trouble.report(str(e) if isinstance(e, ObsUnavailable) else f"cannot switch OBS to {target!r}: {e}")
            return None
        if target == self.fallback.fallback_scene:
            logger.info("streamnode: switched OBS to the fallback scene %r", target)
        else:
            logger.info("streamnode: switched OBS back to scene %r", target)
        return target


class ObsWebsocketScenes:
    """`Scenes` over obs-websocket 5 (OBS 28+: Tools → WebSocket Server Settings, port 4455).

    obsws-python is imported here and nowhere else: the OBS script and the tests of the
    watchdog's logic do not need it. The connection is made on first use and made again after
    OBS restarts, at most every `retry_s`; until then calls raise `ObsUnavailable` with the
    last reason (the same text each time, so it is logged once). A request OBS answers with an
    error (no such scene) is an answer, not a lost connection.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 4455, password: str = "",
                 timeout: float = 3.0, retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 password_from: str = "the password") -> None:
        try:
            import obsws_python
            from obsws_python.error import OBSSDKError, OBSSDKRequestError
        except ImportError:
            raise RuntimeError("the OBS fallback needs obsws-python: pip install obsws-python") from None
        # obsws-python logs the password at INFO when it connects, and a traceback at ERROR
        # for every failed connect or request, each of which we report ourselves, once.
        logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 1)
        self._obsws = obsws_python
        self._sdk_error, self._request_error = OBSSDKError, OBSSDKRequestError
        self._kwargs = {"host": host, "port": port, "password": password, "timeout": timeout}
        self.where = f"{host}:{port}"
        self._password_from = password_from
        self._client: Any = None
        self._retry_s = retry_s
        self._next_try = -math.inf
        self._failure = ""
        self._clock = clock

    def _explain(self, e: Exception) -> str:
        """Why connecting failed, in words that name the fix."""
        where, text = self.where, str(e)
        if isinstance(e, self._sdk_error):
            if "no password" in text:
                return (f"OBS at {where} wants a password and {self._password_from} is empty "
                        "(OBS: Tools → WebSocket Server Settings → Show Connect Info)")
            # obs-websocket closes the socket on a wrong password; obsws-python then reports
            # that it could not identify.
            return (f"OBS at {where} refused {self._password_from}: check it against Tools → "
                    "WebSocket Server Settings → Show Connect Info")
        if isinstance(e, ConnectionRefusedError):
            return (f"nothing answers at {where} (is OBS running, with Tools → WebSocket Server "
                    "Settings → Enable WebSocket server ticked, on this port?)")
        if isinstance(e, TimeoutError) or "timed out" in text.lower():
            return f"OBS at {where} did not answer within {self._kwargs['timeout']:g} s"
        return f"cannot talk to OBS's websocket at {where}: {type(e).__name__}: {text or 'no reason given'}"

    def _connected(self) -> Any:
        if self._client is not None:
            return self._client
        now = self._clock()
        if now < self._next_try:
            raise ObsUnavailable(self._failure)
        self._next_try = now + self._retry_s
        try:
            self._client = self._obsws.ReqClient(**self._kwargs)
        except Exception as e:  # noqa: BLE001 - anything from the socket or the handshake
            self._failure = f"{self._explain(e)}; trying again every {self._retry_s:g} s"
            raise ObsUnavailable(self._failure) from None
        return self._client

    def _call(self, name: str, *args: Any) -> Any:
        client = self._connected()
        try:
            return getattr(client, name)(*args)
        except self._request_error:
            raise  # OBS answered; the connection is fine
        except Exception as e:  # noqa: BLE001 - a broken socket: connect afresh next time
            self.close()
            self._failure = f"lost the connection to OBS at {self.where} ({type(e).__name__}: {e}); reconnecting"
            self._next_try = -math.inf
            raise ObsUnavailable(self._failure) from None

    def current(self) -> str | None:
        reply = self._call("get_current_program_scene")
        # obs-websocket 5.5 renamed currentProgramSceneName to sceneName; accept both.
        return getattr(reply, "scene_name", None) or getattr(reply, "current_program_scene_name", None)

    def switch(self, name: str) -> None:
        try:
            self._call("set_current_program_scene", name)
        except self._request_error as e:
            if getattr(e, "code", None) == 600:  # ResourceNotFound
                raise LookupError(f"OBS has no scene named {name!r}") from None
            raise

    def names(self) -> list[str]:
        """OBS's scenes, top to bottom as its Scenes dock lists them."""
        scenes = self._call("get_scene_list").scenes
        # obs-websocket numbers scenes from the bottom of the dock.
        return [s["sceneName"] for s in sorted(scenes, key=lambda s: -s.get("sceneIndex", 0))]

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to close cleanly
                client.disconnect()


def watch(session: NodeSession, switcher: FallbackSwitcher, stop: Any, tick_s: float = 0.1) -> None:
    """The watchdog loop: read replies, say hello when silent, switch scenes, log what the node
    does when that changes. Runs until `stop` (a threading.Event) is set."""
    last = ""
    while not stop.wait(tick_s):
        now = time.monotonic()
        session.tick(now)
        condition = session.monitor.condition(now)
        if condition != last:  # before the switch it causes, so the log reads in order
            logger.info("streamnode: %s", condition)
            last = condition
        switcher.step(session.monitor, now)
