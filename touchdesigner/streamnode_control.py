"""streamnode control extension for a TouchDesigner Base COMP (see README.md, "Control panel").

Put this file in a Text DAT inside a Base COMP named `streamnode`, and set the COMP's
Extension 1 to `op('./streamnode_control').module.StreamnodeControl(me)` with Promote on.
Then, anywhere in the project:

    op('streamnode').SetPrompt('a neon city at night')
    op('streamnode').SetGuidance(1.4)
    op('streamnode').Send('/t_index', 20, 35, 45)        # any address in osc_map.csv

Replies (heartbeat, state, fps, latency, errors, applied values) are read by `Poll()`, which
an Execute DAT calls every frame, into a Table DAT `status` inside the COMP. `BuildPage()`
creates the custom parameter pages from streamnode_params.json, and `OnParChange(par)`, called
from a Parameter Execute DAT, sends a parameter when it changes.

The top half of this file is plain Python (socket, struct, json): a minimal OSC codec,
`NodeClient`, `StatusBoard` and `ParamMap`, tested outside TouchDesigner against a real node.
Only `StreamnodeControl` touches TouchDesigner objects (ownerComp, pars, DATs).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_NODE_PORT = 7000
DEFAULT_REPLY_PORT = 7001
HEARTBEAT_TIMEOUT_S = 3.0  # the node beats once a second
HELLO_INTERVAL_S = 2.0
CONNECTION_PARS = ("Nodehost", "Nodeport", "Replyport", "Prefix", "Connect")


# -- OSC codec (OSC 1.0: i h f d s T F N) ---------------------------------------------------------


def _pad(data: bytes) -> bytes:
    return data + b"\x00" * (4 - len(data) % 4)


def encode_message(address: str, args: Sequence[Any] = ()) -> bytes:
    """One OSC message: int → i (h beyond 32 bits), float → f, str → s, bool → T/F, None → N."""
    if not address.startswith("/"):
        raise ValueError(f"an OSC address starts with '/': {address!r}")
    tags, data = ",", b""
    for v in args:
        if isinstance(v, bool):
            tags += "T" if v else "F"
        elif v is None:
            tags += "N"
        elif isinstance(v, int):
            small = -(2**31) <= v < 2**31
            tags += "i" if small else "h"
            data += struct.pack(">i" if small else ">q", v)
        elif isinstance(v, float):
            tags += "f"
            data += struct.pack(">f", v)
        elif isinstance(v, str):
            tags += "s"
            data += _pad(v.encode("utf-8"))
        else:
            raise TypeError(f"cannot send {type(v).__name__} over OSC")
    return _pad(address.encode("utf-8")) + _pad(tags.encode("ascii")) + data


def _string(data: bytes, i: int) -> tuple[str, int]:
    end = data.index(b"\x00", i)
    return data[i:end].decode("utf-8"), (end // 4 + 1) * 4


def decode_message(data: bytes) -> tuple[str, list[Any]]:
    """OSC message bytes → (address, args); ValueError when malformed."""
    try:
        address, i = _string(data, 0)
        args: list[Any] = []
        if i < len(data):
            tags, i = _string(data, i)
            if not tags.startswith(","):
                raise ValueError("type tags must start with ','")
            for tag in tags[1:]:
                if tag in "if":
                    args.append(struct.unpack_from(">" + tag, data, i)[0])
                    i += 4
                elif tag in "hd":
                    args.append(struct.unpack_from(">q" if tag == "h" else ">d", data, i)[0])
                    i += 8
                elif tag == "s":
                    text, i = _string(data, i)
                    args.append(text)
                elif tag in "TFN":
                    args.append({"T": True, "F": False, "N": None}[tag])
                else:
                    raise ValueError(f"unsupported type tag {tag!r}")
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"malformed OSC message: {e}") from None
    if not address.startswith("/"):
        raise ValueError("malformed OSC message: the address must start with '/'")
    return address, args


def decode_packet(data: bytes) -> list[tuple[str, list[Any]]]:
    """Message or bundle (flattened) → messages."""
    if not data.startswith(b"#bundle\x00"):
        return [decode_message(data)]
    out, i = [], 16
    while i + 4 <= len(data):
        size = struct.unpack_from(">i", data, i)[0]
        i += 4
        if size <= 0 or i + size > len(data):
            raise ValueError(f"malformed OSC bundle: element size {size}")
        out.extend(decode_packet(data[i : i + size]))
        i += size
    return out


# -- the socket ----------------------------------------------------------------------------------


class NodeClient:
    """Sends OSC to the node and reads replies; never blocks TouchDesigner's frame.

    Bound to the reply port (7001 unless the node runs with --osc-reply) so the node's replies
    to "the sender's host, port 7001" arrive here. If that port is taken (an OSC In CHOP/DAT on
    7001), sending still works and `listen_error` says why no status arrives.
    """

    def __init__(self, node_host: str = "127.0.0.1", node_port: int = DEFAULT_NODE_PORT,
                 reply_port: int = DEFAULT_REPLY_PORT, listen_host: str | None = None, prefix: str = "") -> None:
        self.target = (node_host, node_port)
        self.prefix = prefix.rstrip("/")
        self.listen_error = ""
        self.bad_packets = 0
        if listen_host is None:  # loopback for a local node; else any interface (replies come from afar)
            listen_host = "127.0.0.1" if node_host in ("127.0.0.1", "localhost") else "0.0.0.0"
        self._sock = self._open(listen_host, reply_port)
        self._closed = False

    def _open(self, host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if hasattr(socket, "SIO_UDP_CONNRESET"):  # Windows: ignore ICMP echoes of earlier sends
            sock.ioctl(socket.SIO_UDP_CONNRESET, False)  # type: ignore[attr-defined]
        try:
            sock.bind((host, port))
        except OSError as e:
            self.listen_error = (f"port {port} is taken ({e.strerror or e}): no status replies; free it or "
                                 "start the node with --osc-reply HOST:PORT and use that port")
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
        sock.setblocking(False)
        return sock

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def send(self, address: str, *args: Any) -> bool:
        """Send `address` (the --osc-prefix is added here) with `args`; False if the OS refused."""
        if self._closed:
            return False
        try:
            self._sock.sendto(encode_message(self.prefix + address, args), self.target)
            return True
        except OSError:
            return False

    def poll(self, limit: int = 256) -> list[tuple[str, list[Any]]]:
        out: list[tuple[str, list[Any]]] = []
        for _ in range(limit):
            if self._closed:
                break
            try:
                data, _ = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                continue
            except OSError:
                break
            try:
                out.extend(decode_packet(data))
            except ValueError:
                self.bad_packets += 1
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


# -- the node's replies → rows of a Table DAT -----------------------------------------------------

STATUS_KEYS = ("state", "heartbeat", "fps", "latency_ms", "dropped", "skipped", "error")


class StatusBoard:
    """The node's replies, kept as name → value, for a Table DAT (`rows()`).

    Rows: connected (1/0), seconds since the last heartbeat, state, heartbeat, fps,
    latency_ms, dropped, skipped, error, then one `applied/...` row per applied value.
    """

    def __init__(self, prefix: str = "", timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.base = prefix.rstrip("/") + "/streamnode/"
        self.timeout_s = timeout_s
        self.values: dict[str, Any] = {}
        self.last_beat: float | None = None

    def on_message(self, address: str, args: Sequence[Any], now: float) -> bool:
        if not address.startswith(self.base):
            return False
        name = address[len(self.base):]
        if name not in STATUS_KEYS and not name.startswith("applied/"):
            return False
        self.values[name] = args[0] if len(args) == 1 else " ".join(str(a) for a in args)
        if name == "heartbeat":
            self.last_beat = now
        return True

    def connected(self, now: float) -> bool:
        return self.last_beat is not None and now - self.last_beat <= self.timeout_s

    def rows(self, now: float) -> list[list[str]]:
        since = "" if self.last_beat is None else f"{now - self.last_beat:.1f}"
        rows = [["name", "value"], ["connected", "1" if self.connected(now) else "0"], ["since_heartbeat_s", since]]
        rows += [[k, _text(self.values.get(k, ""))] for k in STATUS_KEYS]
        rows += [[k, _text(v)] for k, v in sorted(self.values.items()) if k.startswith("applied/")]
        return rows


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


# -- parameter page description → messages --------------------------------------------------------


def _parse_list(text: str, tags: str) -> list[Any]:
    """A list typed into a Str parameter → OSC arguments. `tags` is one group's type tags:
    "i": "32 45" → [32, 45]; "sf": "a cat:0.7 | a dog:0.3" → ["a cat", 0.7, "a dog", 0.3]."""
    if len(tags) == 1:
        return [int(t) if tags == "i" else float(t) for t in text.replace(",", " ").split()]
    out: list[Any] = []
    for item in (s.strip() for s in text.split("|")):
        if not item:
            continue
        head, sep, weight = item.rpartition(":")
        if not sep:
            raise ValueError(f"{item!r}: expected value:weight, e.g. a cat:0.7")
        out += [int(head) if tags[0] == "i" else head.strip(), float(weight)]
    return out


class ParamMap:
    """streamnode_params.json → which parameter sends which message.

    `message(name, value_of)` gives (address, args) for a parameter name such as `Guidance`,
    `B0rectx`, `L0weight` or `C0scale` (brush pages expanded for `brushes` brushes, LoRA pages for
    `loras` LoRAs, ControlNet pages for `controlnets` nets); `value_of(name)` reads a parameter's current value (the other parameters of a
    multi-value address included).
    """

    def __init__(self, document: dict[str, Any], brushes: int = 0, loras: int = 0, lfos: int = 0,
                 cues: int = 0, controlnets: int = 0) -> None:
        self.document = document
        self.entries: dict[str, dict[str, Any]] = {}
        for page in self.pages(brushes, loras, lfos, cues, controlnets):
            for entry in page["pars"]:
                self.entries[entry["name"]] = entry

    def pages(self, brushes: int, loras: int = 0, lfos: int = 0, cues: int = 0,
              controlnets: int = 0) -> list[dict[str, Any]]:
        """Pages with the group templates (brush, LoRA, LFO, cue, ControlNet) expanded to indices 0..count-1."""
        counts = {"brush": brushes, "lora": loras, "lfo": lfos, "cues": cues, "controlnet": controlnets}
        out = []
        for page in self.document["pages"]:
            count = counts.get(page["group"], 0) if page.get("group") else None
            if count is None:
                out.append(page)
                continue
            for n in range(count):
                out.append({"name": page["name"].format(n=n), "pars": [
                    {**e, "name": e["name"].format(n=n), "address": e["address"].replace("/N/", f"/{n}/")}
                    for e in page["pars"]]})
        return out

    def group(self, name: str) -> list[str]:
        """All parameter names that make up `name`'s address, in argument order."""
        address = self.entries[name]["address"]
        return [k for k, e in self.entries.items() if e["address"] == address]

    def message(self, name: str, value_of: Callable[[str], Any]) -> tuple[str, list[Any]] | None:
        """The message for a changed parameter; None when there is nothing to send (an empty
        preset menu, an empty list)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        style, address = entry["style"], entry["address"]
        if style == "Pulse":
            return address, []
        if "arg_count" in entry:
            names = sorted(self.group(name), key=lambda n: self.entries[n]["arg_index"])
            return address, [float(value_of(n)) for n in names]
        value = value_of(name)
        if "repeat" in entry:
            args = _parse_list(str(value), entry["arg_tags"])
            return (address, args) if args else None
        if style == "Toggle":
            return address, [1 if value else 0]
        if style == "Int":
            return address, [int(value)]
        if style == "Float":
            return address, [float(value)]
        text = str(value)
        if style == "StrMenu" and not text:
            return None
        return address, [text]


# -- TouchDesigner ---------------------------------------------------------------------------------


class StreamnodeControl:
    """The extension. Optional custom parameters on the COMP configure it: Nodehost, Nodeport,
    Replyport, Prefix (the node's --osc-prefix); otherwise 127.0.0.1:7000, replies on 7001."""

    def __init__(self, ownerComp: Any) -> None:
        self.ownerComp = ownerComp
        self.client: NodeClient | None = None
        self.board = StatusBoard()
        self.params: ParamMap | None = None
        self._last_hello = 0.0
        self._last_rows: list[list[str]] = []
        self.Connect()

    def _par(self, name: str, default: Any) -> Any:
        par = getattr(self.ownerComp.par, name, None)
        return default if par is None else par.eval()

    def Connect(self) -> None:
        """(Re)open the socket with the COMP's current settings."""
        if self.client is not None:
            self.client.close()
        prefix = str(self._par("Prefix", "")).strip()
        self.client = NodeClient(str(self._par("Nodehost", "127.0.0.1")).strip() or "127.0.0.1",
                                 int(self._par("Nodeport", DEFAULT_NODE_PORT)),
                                 int(self._par("Replyport", DEFAULT_REPLY_PORT)), prefix=prefix)
        self.board = StatusBoard(prefix)
        if self.client.listen_error:
            self.board.values["error"] = self.client.listen_error  # shown in the status table

    # -- sending

    def Send(self, address: str, *args: Any) -> bool:
        """Send any address of osc_map.csv, e.g. Send('/t_index', 20, 35, 45)."""
        return self.client is not None and self.client.send(address, *args)

    def SetPrompt(self, text: str) -> bool:
        return self.Send("/prompt", str(text))

    def SetNegativePrompt(self, text: str) -> bool:
        return self.Send("/negative_prompt", str(text))

    def SetGuidance(self, value: float) -> bool:
        return self.Send("/guidance", float(value))

    def SetDelta(self, value: float) -> bool:
        return self.Send("/delta", float(value))

    def SetStrength(self, value: float) -> bool:
        return self.Send("/strength", float(value))

    def SetSeed(self, seed: int) -> bool:
        return self.Send("/seed", int(seed))

    def SetTIndex(self, *steps: int) -> bool:
        return self.Send("/t_index", *(int(s) for s in steps))

    def SetPreset(self, name: str) -> bool:
        return self.Send("/preset", str(name))

    def Pause(self, on: bool = True) -> bool:
        return self.Send("/pause", 1 if on else 0)

    def Bypass(self, on: bool = True) -> bool:
        return self.Send("/bypass", 1 if on else 0)

    def RequestStatus(self) -> bool:
        return self.Send("/status")

    # -- receiving (call every frame from an Execute DAT's onFrameStart)

    def Poll(self) -> None:
        if self.client is None:
            return
        now = time.monotonic()
        for address, args in self.client.poll():
            self.board.on_message(address, args, now)
        if not self.board.connected(now) and now - self._last_hello >= HELLO_INTERVAL_S:
            self._last_hello = now
            self.client.send("/status")  # (re)introduce ourselves: the node replies to who spoke last
        rows = self.board.rows(now)
        if rows != self._last_rows:
            self._last_rows = rows
            table = self.ownerComp.op("status")
            if table is not None:
                table.clear()
                for row in rows:
                    table.appendRow(row)

    # -- the parameter page

    def BuildPage(self, source: str = "streamnode_params", brushes: int = 0, loras: int = 0, lfos: int = 0,
                  cues: int = 0, controlnets: int = 0) -> None:
        """Create the custom pages from streamnode_params.json: `source` is a DAT inside the COMP
        holding the JSON, or a path to the file. `brushes` adds a page per regional-prompt brush,
        `loras` a page per LoRA of the stack (its source and a weight fader), `lfos` a page per
        LFO, `cues` a page per cue of the cue list, `controlnets` a page per ControlNet (its model,
        map source and scale fader).
        Parameters that already exist are left as they are (values included)."""
        dat = self.ownerComp.op(source)
        if dat is not None:
            text = dat.text
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        document = json.loads(text)
        self.params = ParamMap(document, brushes, loras, lfos, cues, controlnets)
        connection = {"name": "Connection", "pars": [
            {"name": "Nodehost", "label": "Node host", "style": "Str", "default": "127.0.0.1"},
            {"name": "Nodeport", "label": "OSC port", "style": "Int", "default": document["osc_port"],
             "min": 1, "max": 65535, "clamp": [True, True], "norm": [1, 65535]},
            {"name": "Replyport", "label": "Reply port", "style": "Int", "default": document["reply_port"],
             "min": 1, "max": 65535, "clamp": [True, True], "norm": [1, 65535]},
            {"name": "Prefix", "label": "Address prefix", "style": "Str", "default": ""},
            {"name": "Connect", "label": "Connect", "style": "Pulse"},
        ]}
        for page_spec in [*self.params.pages(brushes, loras, lfos, cues, controlnets), connection]:
            self._build(page_spec)
        self.Connect()

    def _build(self, page_spec: dict[str, Any]) -> None:
        comp = self.ownerComp
        page = next((p for p in comp.customPages if p.name == page_spec["name"]), None)
        if page is None:
            page = comp.appendCustomPage(page_spec["name"])
        for e in page_spec["pars"]:
            if getattr(comp.par, e["name"], None) is not None:
                continue
            getattr(page, "append" + e["style"])(e["name"], label=e["label"])
            par = getattr(comp.par, e["name"])
            if e["style"] in ("Int", "Float"):
                par.min, par.max = e["min"], e["max"]
                par.clampMin, par.clampMax = e["clamp"]
                par.normMin, par.normMax = e["norm"]
            elif e["style"] == "StrMenu":
                par.menuNames = par.menuLabels = e["menu"]
            if "default" in e:
                par.default = e["default"]
                par.val = e["default"]
            if "address" in e:
                par.help = f"{e['address']} {e['osc_types']}: {e['description']}"

    def OnParChange(self, par: Any) -> None:
        """Call from a Parameter Execute DAT (onValueChange and onPulse) on this COMP."""
        if par.name in CONNECTION_PARS:
            if par.name == "Connect":
                self.Connect()
            return
        if self.params is None:
            source = self.ownerComp.op("streamnode_params")
            if source is None:
                return
            self.params = ParamMap(json.loads(source.text), brushes=32, loras=16, lfos=16, cues=64, controlnets=8)
        try:
            message = self.params.message(par.name, lambda n: getattr(self.ownerComp.par, n).eval())
        except ValueError as e:  # a list typed wrong: say so where the status shows
            self.board.values["error"] = f"{par.name}: {e}"
            return
        if message is not None:
            self.Send(message[0], *message[1])
