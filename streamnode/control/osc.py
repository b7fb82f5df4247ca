"""OSC control: the address table, validation, dedupe, the UDP server, replies and heartbeat.

Three threads, none of which touches the model:

- `osc-recv` reads datagrams, drops senders outside the allow-list, unpacks bundles, checks
  each message against `ADDRESSES` (type, arity, range, NaN/inf, string length), drops values
  equal to the last accepted one, and `put()`s typed `Update`s on the node's `ControlQueue`.
  Every message is handled in isolation: a bad one costs one error reply, never the loop.
- `osc-send` sends everything that goes out (error replies, the applied echo handed over by
  the engine thread, heartbeat and status) so neither the receive loop nor the engine thread
  ever waits on a socket; with OSCQuery it also hands what changed to the LISTEN clients.
- `oscquery-http` (optional, `oscquery.py`, `oscquery_tree.py`) serves the address tree with
  live values over HTTP and pushes changes over websockets.

The table (`ADDRESSES`) is derived from the live-parameter schema (live_params.py): every
address, type, range, default and help text comes from there, so the OSC surface, the config
file, the engine and docs/osc.md cannot drift apart. The server keeps no copy of the values in
force: it reads the node's `LiveState` (dedupe, echo, /status, OSCQuery).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.parsing import osc_types

from streamnode.config import ConfigError, OscConfig, RuntimeConfig, find_preset, is_preset_name, list_presets
from streamnode.control.updates import STATES, ControlQueue, Update
from streamnode.live_params import (
    BRUSH_ORDER_OSC,
    GROUPS,
    MAX_BRUSHES,
    QUANTIZE_MODES,
    TRIGGERS,
    LiveParams,
    LiveState,
    NodeParams,
    check_field,
)
from streamnode.log_limit import LogLimiter

logger = logging.getLogger(__name__)


_SUPPORTED_TAGS = frozenset("ifdhsTFN")
"""Incoming argument types we read; anything else (arrays, blobs, MIDI…) is rejected up front."""

_BUNDLE = b"#bundle\x00"
_MAX_BUNDLE_DEPTH = 8
_RECV_TICK_S = 0.1
_RECV_BURST = 256  # datagrams read per wake-up before looking at the stop flag again
_SEND_TICK_S = 0.02  # upper bound on how long an applied echo waits in the outbox
_STATUS_POLL_S = 0.25  # state/error changes reach surfaces within this
_HEARTBEAT_S = 1.0
_MAX_PEERS = 8


class OscReject(ValueError):
    """A message we will not apply; the text is the reason sent back in /streamnode/error."""


class OscStartError(RuntimeError):
    """The server could not start (port in use, bad host); the message says what to change."""


# -- the address table ---------------------------------------------------------------------


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


@dataclass(frozen=True, slots=True)
class Arg:
    """One OSC argument: declared type tag, inclusive range (numbers) or length cap (strings)."""

    tag: Literal["i", "f", "s"]
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    name: str = ""
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.tag == "s":
            return f"≤ {self.max_len} chars" if self.max_len is not None else "any"
        return f"{_num(self.min)}..{_num(self.max)}"


def _num(x: float | None) -> str:
    if x is None:
        return "…"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Param:
    """One OSC address the node listens on.

    `args` is one group of arguments; `repeat` says how many groups a message may carry
    (`/t_index` takes 1..8 ints, `/prompt_blend` 1..8 (string, float) pairs). `key` is the
    `Update` key; the addresses of an indexed group (`/brush/N/...`, `/lora/N/...`; `group` its
    name, which is also the key) carry `field`, the group's schema field.
    `schema` is the model whose field validates the value (None: checked by `finish` only).
    """

    address: str
    args: tuple[Arg, ...]
    key: str | None
    description: str
    default: Any = None
    repeat: tuple[int, int] = (1, 1)
    kind: Literal["value", "trigger"] = "value"
    field: str | None = None
    finish: Callable[[Any], Any] | None = None
    """Extra check/conversion after types and ranges; raises OscReject."""
    schema: type[BaseModel] | None = None
    group: str | None = None
    """The indexed group (live_params.GROUPS) whose `/<group>/N/<field>` address this is."""

    @property
    def is_brush(self) -> bool:
        return self.group == "brush"

    @property
    def signature(self) -> str:
        """Type tags as docs show them: `f`, `i…`, `(s f)…`, `f f f f`, `—` for a bare trigger."""
        if self.kind == "trigger":
            return "— or i"
        tags = " ".join(a.tag for a in self.args)
        if self.repeat == (1, 1):
            return tags
        return f"({tags})…" if len(self.args) > 1 else f"{tags}…"

    @property
    def range_text(self) -> str:
        if self.kind == "trigger":
            return "rising edge: 0→1 fires"
        parts = [f"{a.name + ' ' if a.name and len(self.args) > 1 else ''}{a.range_text()}" for a in self.args]
        text = ", ".join(parts)
        if self.repeat != (1, 1):
            unit = "values" if len(self.args) == 1 else "pairs"
            text += f"; {self.repeat[0]}..{self.repeat[1]} {unit}"
        return text

    @property
    def default_text(self) -> str:
        d = self.default
        if self.kind == "trigger":
            return "—"
        if d is None:
            return "—"
        if isinstance(d, bool):
            return str(int(d))
        if isinstance(d, str):
            return f'"{d}"'
        if isinstance(d, (list, tuple)):
            return " ".join(_num(x) if isinstance(x, (int, float)) else str(x) for x in d)
        return _num(d) if isinstance(d, (int, float)) else str(d)

    def osc_types(self, value: Any = None) -> str:
        """The OSC type tag string of `value` (or of one group when there is no value)."""
        count = len(value) if self.repeat != (1, 1) and isinstance(value, (list, tuple)) else 1
        return "".join(a.tag for a in self.args) * count

    # -- incoming

    def convert(self, params: list[Any], address: str | None = None) -> Any:
        """OSC arguments → the value the engine takes; raises OscReject naming `address` (the
        address as sent, prefix and brush number included) and what is allowed."""
        address = address or self.address
        try:
            if self.kind == "trigger":
                if not params or (len(params) == 1 and params[0] is None):
                    return None
                level = params[0] if len(params) == 1 else None
                if isinstance(level, bool):
                    return float(level)
                if not isinstance(level, (int, float)) or not math.isfinite(level):
                    raise OscReject(f"expects a number (0→1 fires) or no argument, got {_describe_args(params)}")
                return float(level)
            width = len(self.args)
            lo, hi = self.repeat
            if len(params) % width or not lo <= len(params) // width <= hi:
                raise OscReject(f"takes {self.signature} ({self.range_text}); got {_describe_args(params)}")
            values = [_coerce(self.args[i % width], v) for i, v in enumerate(params)]
            if self.repeat == (1, 1):
                value: Any = values[0] if width == 1 else tuple(values)
            elif width == 1:
                value = values
            else:
                value = [tuple(values[i : i + width]) for i in range(0, len(values), width)]
            if self.finish:
                value = self.finish(value)
            if self.schema is not None:
                # The schema's own rules (strictly increasing indices, weights not all 0, a mask
                # that is a .png…), so OSC, presets and the engine refuse exactly the same values.
                try:
                    check_field(self.schema, self.field or self.key or "", value)
                except ValueError as e:
                    raise OscReject(str(e)) from None
            return value
        except OscReject as e:
            raise OscReject(f"{address[:120]}: {e}") from None

    # -- outgoing

    def to_osc(self, value: Any) -> list[tuple[str, Any]]:
        """(tag, value) pairs for the applied echo, OSCQuery's VALUE and its LISTEN messages."""
        if self.kind == "trigger" or value is None:
            return []
        flat: list[Any]
        if self.repeat != (1, 1):
            flat = [x for group in value for x in (group if isinstance(group, (list, tuple)) else (group,))]
        elif len(self.args) > 1:
            flat = list(value)
        else:
            flat = [value]
        out = []
        for i, v in enumerate(flat):
            tag = self.args[i % len(self.args)].tag
            if tag == "i":
                v = int(v)
                out.append(("h" if not -(2**31) <= v < 2**31 else "i", v))
            elif tag == "f":
                out.append(("f", float(v)))
            else:
                out.append(("s", str(v)))
        return out


def _describe_args(params: list[Any]) -> str:
    if not params:
        return "no arguments"
    return f"{len(params)} argument{'s' if len(params) > 1 else ''} ({' '.join(_type_name(p) for p in params)})"


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "T/F"
    if isinstance(v, int):
        return "i"
    if isinstance(v, float):
        return "f"
    if isinstance(v, str):
        return "s"
    return "N" if v is None else type(v).__name__


def _coerce(arg: Arg, v: Any) -> Any:
    """One OSC argument → int, float or str, within range. Numbers arrive as i, f, h, d or T/F
    from different surfaces, so any number fits a number slot; ints round floats (a CHOP
    sends every channel as a float). Strings are never numbers and numbers never strings."""
    if arg.tag == "s":
        if not isinstance(v, str):
            raise OscReject(f"expects a string, got {_type_name(v)} {v!r:.40}")
        if arg.max_len is not None and len(v) > arg.max_len:
            raise OscReject(f"a string of {len(v)} chars is too long (at most {arg.max_len})")
        if arg.choices and v not in arg.choices:
            raise OscReject(f"{v[:40]!r} is not one of {', '.join(arg.choices)}")
        return v
    if isinstance(v, bool):
        num: int | float = int(v)
    elif isinstance(v, (int, float)):
        num = v
    else:
        raise OscReject(f"expects a number ({arg.range_text()}), got {_type_name(v)} {v!r:.40}")
    if isinstance(num, float):
        if not math.isfinite(num):
            raise OscReject(f"{num} is not a finite number ({arg.range_text()})")
        # A 32-bit OSC float carries ~7 digits: 1.3 arrives as 1.2999999523. Keep what was meant.
        num = round(num) if arg.tag == "i" else float(f"{num:.7g}")
    elif arg.tag == "f":
        num = float(num)
    if (arg.min is not None and num < arg.min) or (arg.max is not None and num > arg.max):
        label = f"{arg.name} " if arg.name else ""
        raise OscReject(f"{label}{num} is out of range {arg.range_text()}")
    return num


def _preset(name: str) -> str:
    if not is_preset_name(name):
        raise OscReject(f"{name[:64]!r} is not a preset name (letters, digits, - and _; no paths)")
    try:
        find_preset(name)
    except ConfigError:
        names = ", ".join(list(list_presets())[:20]) or "none"
        raise OscReject(f"no preset {name!r}; available: {names}") from None
    return name


def _mask_path(path: str) -> str:
    if not path.lower().endswith(".png") or not os.path.isfile(path):
        raise OscReject(f"{path[:200]!r} is not an existing .png file")
    return path


def _distinct(value: list[int]) -> list[int]:
    if len(set(value)) != len(value):
        raise OscReject(f"{' '.join(map(str, value))}: name each brush once, bottom first, e.g. 2 0 1")
    return value


def _strip(annotation: Any) -> Any:
    """Optional[X] → X; Annotated[X, ...] stays (its constraints are read by `_arg`)."""
    args = get_args(annotation)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return annotation


def _constraints(items: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        for c in [item, *getattr(item, "metadata", [])]:
            for name in ("ge", "le", "max_length", "min_length", "title"):
                if getattr(c, name, None) is not None:
                    out[name] = getattr(c, name)
    return out


def _arg(annotation: Any, metadata: list[Any], name: str = "") -> Arg:
    """One OSC argument from a schema type: its tag, range or length, and name."""
    annotation = _strip(annotation)
    if get_origin(annotation) is Annotated:
        base, *more = get_args(annotation)
        return _arg(base, [*metadata, *more], name)
    c = _constraints(metadata)
    name = name or c.get("title", "")
    if annotation is bool:
        return Arg("i", 0, 1, name=name)
    if annotation is str:
        return Arg("s", max_len=c.get("max_length"), name=name)
    if get_origin(annotation) is Literal:
        return Arg("s", name=name, choices=tuple(str(v) for v in get_args(annotation)))
    if annotation in (int, float):
        return Arg("i" if annotation is int else "f", c.get("ge"), c.get("le"), name=name)
    raise TypeError(f"no OSC argument for the schema type {annotation!r}")


def _from_field(model: type[BaseModel], name: str, *, key: str, field: str | None = None) -> Param:
    """The Param of one schema field: address, arguments, repeat range and help text."""
    info: FieldInfo = model.model_fields[name]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    address = str(extra["osc"])
    annotation = _strip(info.annotation)
    if get_origin(annotation) is Annotated and get_origin(get_args(annotation)[0]) is tuple:
        annotation = get_args(annotation)[0]  # a list type with its own rule (validators run in check_field)
    c = _constraints(list(info.metadata))
    repeat = (1, 1)
    finish: Callable[[Any], Any] | None = bool if annotation is bool else None
    if get_origin(annotation) is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:  # a list: 1..N values or pairs
            repeat = (int(c.get("min_length", 1)), int(c["max_length"]))
            item = _strip(items[0])
            inner = get_args(get_args(item)[0] if get_origin(item) is Annotated else item)
            args = tuple(_arg(a, []) for a in inner) if get_origin(item) is tuple else (_arg(item, []),)
        else:  # a fixed tuple: x y w h
            names = tuple(extra.get("arg_names", ())) or ("",) * len(items)
            args = tuple(_arg(a, [], n) for a, n in zip(items, names, strict=True))
    else:
        args = (_arg(info.annotation, list(info.metadata)),)
    default = info.get_default(call_default_factory=True)
    return Param(address, args, key, info.description or "", default, repeat=repeat, field=field, finish=finish,
                 schema=model)


def _build_addresses() -> list[Param]:
    params = [_from_field(LiveParams, name, key=name) for name in LiveParams.model_fields]
    for name in NodeParams.model_fields:
        param = _from_field(NodeParams, name, key=name)
        # No schema pass: the preset is looked up by name (listing the ones there are); a model id
        # is checked by the loader.
        params.append(dataclasses.replace(param, schema=None if name in ("preset", "model") else NodeParams,
                                          finish=param.finish or _FINISH.get(name),
                                          default=None if name in ("preset", "model") else param.default))
    status = next(t for t in TRIGGERS if t.key == "status")
    params.append(Param(status.address, (), None, status.description, kind="trigger"))
    for trigger in TRIGGERS:  # the node's own actions (/cue_next, /downbeat)
        if trigger.key not in ("status", "clear"):
            params.append(Param(trigger.address, (), trigger.key, trigger.description, kind="trigger"))
    # The indexed groups: regional prompts ("semantic brushes"), the LoRA stack; N in 0..limit-1.
    for group in GROUPS:
        for name in group.params.model_fields:
            param = _from_field(group.params, name, key=group.name, field=name)
            params.append(dataclasses.replace(param, group=group.name, finish=_GROUP_FINISH.get(param.address,
                                                                                                 param.finish)))
        clear = next(t for t in TRIGGERS if t.key == "clear" and t.address.startswith(group.prefix))
        params.append(Param(clear.address, (), group.name, clear.description, kind="trigger", field="clear",
                            group=group.name))
        if group.name == "brush":
            params.append(Param(str(BRUSH_ORDER_OSC["osc"]), (Arg("i", 0, MAX_BRUSHES - 1),), "brush_order",
                                str(BRUSH_ORDER_OSC["description"]), None, repeat=(1, MAX_BRUSHES),
                                finish=_distinct))
    return params


_FINISH: dict[str, Callable[[Any], Any]] = {"preset": _preset}
_GROUP_FINISH: dict[str, Callable[[Any], Any]] = {"/brush/N/mask": _mask_path}


ADDRESSES: list[Param] = _build_addresses()
"""Every address the node listens on (without the --osc-prefix), in documentation order."""

_BY_ADDRESS = {p.address: p for p in ADDRESSES}
_GROUP_FIELDS: dict[str, dict[str, Param]] = {
    g.name: {p.address.rsplit("/", 1)[1]: p for p in ADDRESSES if p.group == g.name} for g in GROUPS
}
_VALUE_PARAMS = [p for p in ADDRESSES if p.kind == "value"]

Limits = Mapping[str, int] | int
"""How many indices each group has (`runtime.max_brushes`, `runtime.max_loras`), by group name;
an int gives every group the same."""


def _limit(limits: Limits, group: str) -> int:
    return limits if isinstance(limits, int) else int(limits.get(group, 0))

OUT_ADDRESSES: list[tuple[str, str, str]] = [
    ("/streamnode/heartbeat", "i", "Once a second; counts up from 1."),
    ("/streamnode/state", "s", f"On change and with each heartbeat: {', '.join(STATES)}."),
    ("/streamnode/fps", "f", "Output frames per second, with each heartbeat."),
    ("/streamnode/latency_ms", "f", "Median capture→output latency, with each heartbeat."),
    ("/streamnode/dropped", "i", "Input frames dropped so far (the engine was busy)."),
    ("/streamnode/skipped", "i", "Frames skipped by the similarity filter so far."),
    ("/streamnode/error", "s", "Why a message was rejected, or the node's error (to the sender / all)."),
    ("/streamnode/beat", "i i f", "On each beat of the clock (docs/tempo.md): bar, beat in the bar (0..), bpm."),
    ("/streamnode/applied/<address>", "as sent", "Echo of each value the engine applied, e.g. "
     "/streamnode/applied/guidance f."),
]
"""What the node sends (prefixed with --osc-prefix like the inputs)."""


def markdown_table() -> str:
    """The input address table as docs/osc.md shows it (a test keeps the two identical)."""
    rows = ["| Address | Type | Range | Default | What it does |", "|---|---|---|---|---|"]
    for p in ADDRESSES:
        rows.append(f"| `{p.address}` | {p.signature} | {p.range_text} | {p.default_text} | {p.description} |")
    return "\n".join(rows) + "\n"


def lookup(address: str, limits: Limits) -> tuple[Param, int | None] | None:
    """Local address (no prefix) → its Param and index (in an indexed group); None if we don't serve it."""
    param = _BY_ADDRESS.get(address)
    if param is not None:
        return None if param.group else (param, None)
    _, group, n, *rest = address.split("/") if address.count("/") >= 3 else ("", "", "", "")
    fields = _GROUP_FIELDS.get(group)
    if fields and len(rest) == 1 and n.isdigit() and len(n) <= 3 and int(n) < _limit(limits, group) and rest[0] in fields:
        return fields[rest[0]], int(n)
    return None


def param_address(param: Param, index: int | None) -> str:
    return param.address.replace("/N/", f"/{index}/") if index is not None else param.address


def value_at(live: LiveState, param: Param, index: int | None = None) -> Any:
    """The value in force at an address, from the node's live state; None where nothing is in force
    (the prompt while a blend is, a brush or LoRA that does not exist, a mask that came as an array)."""
    if param.group:
        params = live.group(param.group).get(index) if index is not None else None
        return None if params is None or param.field is None else getattr(params, param.field)
    if param.key == "brush_order":
        return list(live.brush_order) or None
    if param.key in ("preset", "model"):
        return getattr(live.node, param.key) or None
    if param.key in NodeParams.model_fields:
        return getattr(live.node, param.key)
    if param.key in LiveParams.model_fields:
        return getattr(live.params, param.key)
    return None


def _indices(live: LiveState, group: str, limits: Limits) -> list[int]:
    return sorted(i for i in live.group(group) if i < _limit(limits, group))


def _changed(old: LiveState, new: LiveState, limits: Limits) -> list[str]:
    """The addresses whose value differs between two live states (indexed groups expanded)."""
    indices = {g.name: sorted(set(_indices(old, g.name, limits)) | set(_indices(new, g.name, limits))) for g in GROUPS}
    changed = []
    for p in _VALUE_PARAMS:
        for n in indices[p.group] if p.group else [None]:
            before, now = value_at(old, p, n), value_at(new, p, n)
            if (before is None) != (now is None) or (before is not None and not _same(before, now)):
                changed.append(param_address(p, n))
    return changed


def live_values(live: LiveState, limits: Limits) -> dict[str, Any]:
    """Every address with a value in force (indexed groups expanded): what /status and OSCQuery report."""
    values: dict[str, Any] = {}
    for p in _VALUE_PARAMS:
        for n in _indices(live, p.group, limits) if p.group else [None]:
            value = value_at(live, p, n)
            if value is not None:
                values[param_address(p, n)] = value
    return values


# -- small helpers ----------------------------------------------------------------------------


class _TokenBucket:
    """Caps error replies so a flood of bad messages cannot turn into a flood of replies."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _bundle_elements(data: bytes) -> Iterator[bytes]:
    """Messages inside a bundle, nested bundles flattened, timetags ignored (applied at once).

    Written here rather than with python-osc's OscBundle: a negative element size makes that
    parser loop forever, and one garbage datagram must never stall the receive thread.
    """
    stack = [(data, 16, 0)]
    if len(data) < 16:
        raise OscReject("bundle: shorter than its header")
    while stack:
        buf, i, depth = stack.pop()
        while i < len(buf):
            if i + 4 > len(buf):
                raise OscReject("bundle: truncated element size")
            size = int.from_bytes(buf[i : i + 4], "big", signed=True)
            i += 4
            if size <= 0 or size % 4 or i + size > len(buf):
                raise OscReject(f"bundle: bad element size {size}")
            element = buf[i : i + size]
            i += size
            if element.startswith(_BUNDLE):
                if depth + 1 >= _MAX_BUNDLE_DEPTH or len(element) < 16:
                    raise OscReject("bundle: nested too deep or too short")
                stack.append((buf, i, depth))
                buf, i, depth = element, 16, depth + 1
            else:
                yield element


def _parse(data: bytes) -> tuple[str, list[Any]]:
    """Datagram → (address, arguments) with python-osc, after checking the type tags we read
    (python-osc logs unknown tags on the root logger; a fuzzer must not be able to spam it)."""
    try:
        address, index = osc_types.get_string(data, 0)
        if index < len(data):
            tags, _ = osc_types.get_string(data, index)
            if not tags.startswith(","):
                raise OscReject("malformed OSC message: the type tag string must start with ','")
            unsupported = set(tags[1:]) - _SUPPORTED_TAGS
            if unsupported:
                raise OscReject(
                    f"{address[:80]}: unsupported OSC argument type {''.join(sorted(unsupported))!r} "
                    "(send i, f, h, d, s, T, F or N)"
                )
        msg = OscMessage(data)
    except OscReject:
        raise
    except Exception as e:  # python-osc raises ParseError, UnicodeDecodeError, struct.error…
        raise OscReject(f"malformed OSC message ({type(e).__name__})") from None
    if not address.startswith("/"):
        raise OscReject("malformed OSC message: the address must start with '/'")
    return address, msg.params


def _build(address: str, args: list[tuple[str, Any]]) -> bytes:
    builder = OscMessageBuilder(address=address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


def _same(a: Any, b: Any) -> bool:
    """Equal for dedupe purposes: exact for strings and ints, ~1e-6 relative for floats."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- the server -------------------------------------------------------------------------------

StatusFn = Callable[[], dict[str, Any]]
LiveFn = Callable[[], LiveState]


class OscServer:
    """Listens for OSC, validates and queues `Update`s, and sends replies, echo and heartbeat.

    `start()` binds and starts the threads (raises `OscStartError`); `stop(timeout)` joins them
    and closes the socket; both are safe to call twice. `status()` is the node's snapshot
    (state, fps_out, latency_ms_p50, dropped, skipped, error), called from the sender thread
    only, a few times a second. `live()` is the node's `LiveState`, the values in force: a value
    equal to the one in force (or to the one already queued) is dropped before the queue, and
    every value that changes is echoed as /streamnode/applied/<address>.
    """

    def __init__(
        self,
        config: OscConfig,
        queue: ControlQueue,
        status: StatusFn | None = None,
        *,
        live: LiveFn | None = None,
        max_brushes: int | None = None,
        max_loras: int | None = None,
        limits: Mapping[str, int] | None = None,
        beat: Callable[[], Any] | None = None,
        name: str = "streamnode",
    ) -> None:
        self.config = config
        self.queue = queue
        self._status = status
        self._live: LiveFn = live or LiveState
        self.max_brushes = _default(RuntimeConfig, "max_brushes") if max_brushes is None else max_brushes
        self.max_loras = _default(RuntimeConfig, "max_loras") if max_loras is None else max_loras
        self.limits: dict[str, int] = {g.name: _default(RuntimeConfig, g.limit) for g in GROUPS}
        self.limits.update({"brush": self.max_brushes, "lora": self.max_loras, **(limits or {})})
        self._beat = beat  # the tempo's position (node/tempo.py): /streamnode/beat on each beat
        self.name = name
        self._prefix = config.prefix
        self._allow = [ipaddress.ip_network(a, strict=False) for a in config.allow]
        self._allowed_cache: dict[str, bool] = {}
        self._reply_to: tuple[str, int] | None = None
        if config.reply:
            host, _, port = config.reply.rpartition(":")
            self._reply_to = (host.strip("[]"), int(port))

        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._oscquery: Any = None  # OscQueryServer, with --oscquery-port
        self._tree: Any = None  # its AddressTree; changes() is called on the sender thread only
        self._announcement: Any = None  # mDNS, with osc.oscquery_mdns
        # Indexed groups' slot counts: every slot is listed in OSCQuery (writing one creates it).
        self.group_slots: dict[str, int] = dict(self.limits)
        self._started = False
        self._stopped = False

        # The fast path of dedupe: datagrams whose value is the one in force (or queued), dropped
        # unparsed when a CHOP repeats them. A cache of the live state, never a second record of
        # it: written by the receive thread, dropped for an address whenever its value changes,
        # or its update fails (sender thread, engine thread).
        self._memo_lock = threading.Lock()
        self._dgram_of: dict[str, bytes] = {}  # local address → the datagram that carried its value
        self._seen: set[bytes] = set()  # those datagrams
        self._levels: dict[str, float] = {}  # trigger address → last level (rising edge): input state

        self._outbox: deque[tuple[Any, ...]] = deque(maxlen=4096)  # append/popleft never block
        self._peers: dict[str, None] = {}  # hosts that sent us something, newest last
        self._echoed: LiveState | None = None  # the live state the last echo was computed against
        self._checked: LiveState | None = None  # the live state the fast-path memory was last checked against
        self._check_lock = threading.Lock()
        self._just_echoed: dict[str, Any] = {}  # address → value echoed as applied since then (sender thread)

        self._log_limit = LogLimiter(5.0)
        self._reply_bucket = _TokenBucket(rate=20.0, burst=50.0)
        self.counters = {
            "datagrams": 0,  # from allowed senders
            "accepted": 0,  # put on the control queue (or answered, for /status)
            "deduped": 0,  # equal to the last accepted value: dropped before the queue
            "rejected": 0,  # bad type, arity, range, address, bytes
            "denied": 0,  # sender not in --osc-allow
            "foreign": 0,  # another node's --osc-prefix
            "errors_unsent": 0,  # error replies held back by the rate cap
        }
        queue.on_report(self._on_report)

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound UDP port (useful with port 0)."""
        if self._sock is None:
            return self.config.port
        return int(self._sock.getsockname()[1])

    @property
    def oscquery_port(self) -> int | None:
        return self._oscquery.port if self._oscquery is not None else None

    def start(self) -> None:
        if self._started:
            return
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            # CHOP traffic comes in bursts (one datagram per channel per cook): give it room.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if hasattr(socket, "SIO_UDP_CONNRESET"):
            # Windows: a reply to a closed port would otherwise surface as a recv error.
            with contextlib.suppress(OSError):
                sock.ioctl(socket.SIO_UDP_CONNRESET, False)  # type: ignore[attr-defined]
        try:
            sock.bind((host, self.config.port))
        except OSError as e:
            sock.close()
            hint = "choose another --osc-port" if e.errno in (98, 48, 10048) else "check --osc-host"
            raise OscStartError(f"OSC: cannot listen on {host}:{self.config.port}: {e.strerror or e}; {hint}") from e
        sock.setblocking(False)  # the receive loop waits in select(); replies never wait on UDP
        self._sock = sock
        self._started = True
        self._echoed = self._checked = self._live()
        self._threads = [
            threading.Thread(target=self._receive, args=(self._stop,), name="osc-recv", daemon=True),
            threading.Thread(target=self._send_loop, args=(self._stop,), name="osc-send", daemon=True),
        ]
        for t in self._threads:
            t.start()
        if self.config.oscquery_port is not None:
            self._start_oscquery()
        logger.info(
            "OSC listening on %s:%d%s%s", host, self.port,
            f", prefix {self._prefix}" if self._prefix else "",
            f", OSCQuery on http://{host}:{self.oscquery_port}/" if self._oscquery else "",
        )

    def _start_oscquery(self) -> None:
        from streamnode.control.oscquery import OscQueryServer
        from streamnode.control.oscquery_tree import AddressTree

        host = self.config.host
        tree = AddressTree(self._prefix, self.group_slots, self._display_name())
        server = OscQueryServer(
            host, int(self.config.oscquery_port or 0), lambda path: tree.describe(self._live(), path),
            self.oscquery_host_info,
            lambda path: tree.packets(self._live(), path), allowed=self._is_allowed,
        )
        try:
            server.start()
        except ImportError as e:
            self.stop()
            raise OscStartError(f"{e}; or run without --oscquery-port") from e
        except OSError as e:
            self.stop()
            raise OscStartError(
                f"OSCQuery: cannot listen on {host}:{self.config.oscquery_port}: {e}; choose another --oscquery-port"
            ) from e
        tree.changes(self._live())  # LISTEN clients are told what changes from here on
        # The sender thread publishes once it sees the server; the tree is ready before.
        self._tree, self._oscquery = tree, server
        if self.config.oscquery_mdns:
            from streamnode.control.discovery import Announcement

            self._announcement = Announcement(self._display_name(), host, server.port, self.port)
            self._announcement.start()

    def stop(self, timeout: float = 2.0) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake_receiver()
        deadline = time.monotonic() + timeout
        if self._announcement is not None:
            self._announcement.stop(max(0.1, deadline - time.monotonic()))
        if self._oscquery is not None:
            self._oscquery.stop(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning("OSC: thread %s did not stop within %.1f s", t.name, timeout)
        if self._sock is not None:
            self._sock.close()
        logger.info("OSC stopped (%s)", ", ".join(f"{k} {v}" for k, v in self.counters.items() if v))

    def _wake_receiver(self) -> None:
        """An empty datagram to ourselves ends the receive thread's select() at once."""
        sock = self._sock
        if sock is None:
            return
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        with contextlib.suppress(OSError):
            sock.sendto(b"", (host, port))

    def __enter__(self) -> OscServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # -- receive thread

    def _receive(self, stop: threading.Event) -> None:
        sock = self._sock
        assert sock is not None
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not stop.is_set():
                if not selector.select(_RECV_TICK_S):
                    continue
                # Drain what has arrived with one syscall per datagram (a socket timeout would
                # add a poll to each): a CHOP cook is a burst of one datagram per channel.
                for _ in range(_RECV_BURST):
                    if stop.is_set():
                        return
                    try:
                        data, addr = sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if stop.is_set():
                            return
                        # Windows reports an ICMP port-unreachable from an earlier reply here.
                        self._log("recv", "OSC: receive error %s (still serving)", e)
                        break
                    try:
                        self._on_datagram(data, addr[0])
                    except Exception:  # one message must never take the server down
                        if self._log_limit("crash") is not None:
                            logger.exception("OSC: unexpected error handling a datagram from %s (still serving)",
                                             addr[0])

    def _on_datagram(self, data: bytes, host: str) -> None:
        if not self._is_allowed(host):
            self.counters["denied"] += 1
            self._log(f"deny:{host}", "OSC: dropped a message from %s: not in --osc-allow %s",
                      host, ",".join(self.config.allow))
            return
        self.counters["datagrams"] += 1
        if host not in self._peers:
            self._peers[host] = None
            if len(self._peers) > _MAX_PEERS:
                del self._peers[next(iter(self._peers))]
        if data in self._seen:  # the CHOP-every-cook case: same bytes as the accepted value
            self.counters["deduped"] += 1
            return
        if data[:1] == b"/":
            self._on_message(data, host)
        elif data.startswith(_BUNDLE):
            try:
                for element in _bundle_elements(data):
                    if element in self._seen:
                        self.counters["deduped"] += 1
                    else:
                        self._on_message(element, host)
            except OscReject as e:
                self._reject(host, "bundle", str(e))
        else:
            self._reject(host, "garbage", f"not an OSC packet ({len(data)} bytes; expected '/' or '#bundle')")

    def _on_message(self, data: bytes, host: str) -> None:
        try:
            address, params = _parse(data)
        except OscReject as e:
            self._reject(host, "malformed", str(e))
            return
        local = self._strip_prefix(address)
        if local is None:
            self.counters["foreign"] += 1
            return
        if local.startswith("/streamnode/"):
            return  # our own replies looped back by a surface: never answer them (no ping-pong)
        grid = ""
        if local.startswith("/at/"):  # /at/<grid>/<address>: this one change waits for its grid line
            grid, _, rest = local[4:].partition("/")
            if grid not in QUANTIZE_MODES or grid == "off" or not rest:
                self._reject(host, "at", f"{address}: use /at/<grid>/<address> with grid one of "
                             + ", ".join(m for m in QUANTIZE_MODES if m != "off"), address)
                return
            local = "/" + rest
        found = lookup(local, self.limits)
        if found is None:
            self._reject(host, "unknown", self._unknown_reason(address, local), address)
            return
        param, index = found
        if param.key == "model" and not self.config.allow_model_switch:
            self._reject(host, local, f"{address}: loading a model over OSC is off; start the node "
                         "with --allow-model-switch", address)
            return
        try:
            value = param.convert(params, address)
        except OscReject as e:
            self._reject(host, local, str(e), address)
            return
        self._accept(param, index, param_address(param, index), value, data, host, grid)

    def _accept(self, param: Param, index: int | None, local: str, value: Any, data: bytes, host: str,
                grid: str = "") -> None:
        if param.kind == "trigger":
            if value is not None:  # a level: only 0→1 fires; a CHOP repeating 1 does nothing
                with self._memo_lock:
                    prev = self._levels.get(local, 0.0)
                    self._levels[local] = value
                    self._remember_locked(local, data)  # exact repeats skip parsing
                if not (value > 0 >= prev):
                    self.counters["deduped"] += 1
                    return
            self.counters["accepted"] += 1
            if param.key is None:  # /status
                self._outbox.append(("status", self._target(host)))
            else:
                self.queue.put(Update(param.key, (index, param.field, None), origin=local, quantize=grid))
            return
        update = Update(param.key or "", (index, param.field, value) if index is not None else value, origin=local,
                        quantize=grid)
        if self._in_force(update, param, index, value):
            with self._memo_lock:
                self._remember_locked(local, data)
            self.counters["deduped"] += 1
            return
        with self._memo_lock:
            self._remember_locked(local, data)  # repeats while it is queued are the same value
        self.counters["accepted"] += 1
        self.queue.put(update)

    def _in_force(self, update: Update, param: Param, index: int | None, value: Any) -> bool:
        """True when `value` is what the node already uses (or has queued) at this address."""
        if self.queue.pending("preset") is not None:
            return False  # a preset about to change many values: this one must follow it, not vanish
        pending = self.queue.pending(update.slot)
        if pending is not None:
            current = pending.value[2] if index is not None else pending.value
        elif param.key == "model" and self._loading_model() == value:
            return True  # already loading it: a DAT repeating the id must not restart the load
        else:
            current = value_at(self._live(), param, index)
        return current is not None and _same(current, value)

    def _loading_model(self) -> Any:
        return self._read_status().get("loading_model")

    def _remember_locked(self, local: str, data: bytes) -> None:
        old = self._dgram_of.get(local)
        if old is not None:
            self._seen.discard(old)
        self._dgram_of[local] = data
        self._seen.add(data)

    def forget(self, local: str) -> None:
        """Drop the fast-path memory of one address: its next datagram is parsed and compared
        with the value in force again."""
        with self._memo_lock:
            old = self._dgram_of.pop(local, None)
            if old is not None:
                self._seen.discard(old)

    def _strip_prefix(self, address: str) -> str | None:
        if not self._prefix:
            return address
        if address.startswith(self._prefix + "/"):
            return address[len(self._prefix) :]
        return None

    def _unknown_reason(self, address: str, local: str) -> str:
        known = [p.address for p in ADDRESSES if not p.group]
        close = difflib.get_close_matches(local, known, n=1)
        hint = f"; did you mean {self._prefix}{close[0]}?" if close else ""
        for group in GROUPS:
            if local.startswith(group.prefix):
                last = self.limits[group.name] - 1
                hint = (f"; {group.name} addresses are {group.prefix}0 to {group.prefix}{last} "
                        f"(runtime.{group.limit}) with " + ", ".join(_GROUP_FIELDS[group.name]))
        return f"{address[:120]}: unknown address{hint} (docs/osc.md lists them)"

    def _is_allowed(self, host: str) -> bool:
        if not self._allow:
            return True  # loopback-only bind (config refuses an open host without an allow-list)
        cached = self._allowed_cache.get(host)
        if cached is None:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
                if ip.version == 6 and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                cached = any(ip in net for net in self._allow)
            except ValueError:
                cached = False
            if len(self._allowed_cache) > 1024:
                self._allowed_cache.clear()
            self._allowed_cache[host] = cached
        return cached

    def _target(self, host: str) -> tuple[str, int]:
        return self._reply_to or (host, self.config.reply_port)

    def _reject(self, host: str, key: str, reason: str, address: str = "") -> None:
        self.counters["rejected"] += 1
        suppressed = self._log_limit(f"reject:{key}")
        if suppressed is not None:
            more = f" ({suppressed} more like it suppressed)" if suppressed else ""
            logger.warning("OSC from %s rejected: %s%s", host, reason, more)
        if self._reply_bucket.take():
            self._outbox.append(("send", self._target(host), self._out("/streamnode/error"), [("s", reason[:1000])]))
        else:
            self.counters["errors_unsent"] += 1

    def _log(self, key: str, msg: str, *args: Any) -> None:
        suppressed = self._log_limit(key)
        if suppressed is None:
            return
        if suppressed:
            msg, args = msg + " (%d more like it suppressed)", (*args, suppressed)
        logger.warning(msg, *args)

    # -- engine thread (must not block)

    def _on_report(self, update: Update, error: str | None) -> None:
        if error is not None:
            if update.origin:
                self.forget(update.origin)  # the value is not in force: the same value may be retried
            return
        # Before the echo leaves: a surface that answers it at once must find the memory current.
        self._invalidate(self._live())
        if self._started and not self._stopped and update.origin.startswith("/"):
            self._outbox.append(("applied", update))

    def _invalidate(self, live: LiveState) -> None:
        """Forget the fast-path memory of every address whose value changed since the last look."""
        with self._check_lock:
            old, self._checked = self._checked, live
        if old is None or old is live:
            return
        for local in _changed(old, live, self.limits):
            self.forget(local)

    # -- sender thread

    def _out(self, address: str) -> str:
        return self._prefix + address

    def _send_loop(self, stop: threading.Event) -> None:
        beat = 0
        next_poll = next_beat = time.monotonic()
        last_state: Any = None
        last_error: Any = None
        last_beat: int | None = None
        while not stop.wait(_SEND_TICK_S):
            try:
                self._flush_outbox()
                if self._beat is not None:
                    last_beat = self._send_beat(last_beat)
                self._echo_changes()
                if self._oscquery is not None:
                    self._oscquery.publish(*self._tree.changes(self._live()))
                now = time.monotonic()
                if now < next_poll:
                    continue
                next_poll = now + _STATUS_POLL_S
                st = self._read_status()
                state, error = st.get("state"), st.get("error")
                if state and state != last_state:
                    self._send_all("/streamnode/state", [("s", str(state))])
                    last_state = state
                if error and error != last_error:
                    self._send_all("/streamnode/error", [("s", str(error)[:1000])])
                last_error = error
                if now >= next_beat:
                    next_beat = now + _HEARTBEAT_S
                    beat += 1
                    self._send_all("/streamnode/heartbeat", [("i", beat)])
                    for address, args in self._status_messages(st):
                        self._send_all(address, args)
            except Exception:  # a bad status() must not silence the heartbeat for good
                if self._log_limit("send-loop") is not None:
                    logger.exception("OSC: error in the reply thread (still running)")

    def _send_beat(self, last: int | None) -> int:
        """/streamnode/beat bar beat bpm when a new beat began (within one send tick of it)."""
        position = self._beat()  # type: ignore[misc]
        whole = math.floor(position.beat)
        if whole != last and last is not None:
            self._send_all("/streamnode/beat", [("i", position.bar), ("i", position.beat_in_bar),
                                                ("f", float(position.bpm))])
        return whole

    def _flush_outbox(self) -> None:
        while self._outbox:
            item = self._outbox.popleft()
            kind = item[0]
            if kind == "send":
                _, target, address, args = item
                self._send(target, address, args)
            elif kind == "applied":
                self._echo_applied(item[1])
            elif kind == "status":
                self._full_status(item[1])

    def _echo_applied(self, update: Update) -> None:
        """Each update applied from OSC is echoed at its address, as sent (a trigger with no value)."""
        found = lookup(update.origin, self.limits)
        if found is None:
            return
        param = found[0]
        value = update.value[2] if update.key in _GROUP_FIELDS else update.value
        self._just_echoed[update.origin] = value
        self._send_all(self._out("/streamnode/applied" + update.origin), param.to_osc(value))

    def _echo_changes(self) -> None:
        """Echo every other value that changed in the live state since the last look, whoever
        changed it (a preset, a model switch, a shm mask, a side effect such as the t_index a
        strength picks); forget the fast-path memory of each, so a surface may send any of them
        again."""
        live = self._live()
        self._invalidate(live)
        old = self._echoed
        just, self._just_echoed = self._just_echoed, {}
        self._echoed = live
        if live is old or old is None:
            return
        for local in _changed(old, live, self.limits):
            found = lookup(local, self.limits)
            if found is None:
                continue
            now = value_at(live, *found)
            if now is None or (local in just and _same(just[local], now)):
                continue  # nothing in force to show, or echoed as applied a moment ago
            self._send_all(self._out("/streamnode/applied" + local), found[0].to_osc(now))

    def _status_messages(self, st: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
        out: list[tuple[str, list[tuple[str, Any]]]] = []
        if st.get("state"):
            out.append(("/streamnode/state", [("s", str(st["state"]))]))
        for name, key, tag in (("fps", "fps_out", "f"), ("latency_ms", "latency_ms_p50", "f"),
                               ("dropped", "dropped", "i"), ("skipped", "skipped", "i")):
            value = st.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append((f"/streamnode/{name}", [(tag, float(value) if tag == "f" else int(value))]))
        return out

    def _full_status(self, target: tuple[str, int]) -> None:
        st = self._read_status()
        for address, args in self._status_messages(st):
            self._send(target, self._out(address), args)
        self._send(target, self._out("/streamnode/error"), [("s", str(st.get("error") or ""))])
        for local, value in live_values(self._live(), self.limits).items():
            found = lookup(local, self.limits)
            if found is not None:
                self._send(target, self._out("/streamnode/applied" + local), found[0].to_osc(value))

    def _send_all(self, address: str, args: list[tuple[str, Any]]) -> None:
        if not address.startswith(self._prefix + "/streamnode/"):
            address = self._out(address)
        targets = [self._reply_to] if self._reply_to else [(h, self.config.reply_port) for h in list(self._peers)]
        for target in targets:
            self._send(target, address, args)

    def _send(self, target: tuple[str, int], address: str, args: list[tuple[str, Any]]) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(_build(address, args), target)
        except (OSError, ValueError) as e:  # unreachable peer, closed socket, unbuildable value
            self._log(f"send:{target}", "OSC: cannot send %s to %s:%s: %s", address, target[0], target[1], e)

    def _read_status(self) -> dict[str, Any]:
        if self._status is None:
            return {}
        try:
            st = self._status()
            return st if isinstance(st, dict) else {}
        except Exception:
            if self._log_limit("status") is not None:
                logger.exception("OSC: status() failed")
            return {}

    # -- OSCQuery

    def _display_name(self) -> str:
        return f"{self.name} {self._prefix}".strip()

    def oscquery_host_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"NAME": self._display_name()}
        if self.config.host not in ("0.0.0.0", "::"):  # a wildcard: clients use the address they reached us at
            info["OSC_IP"] = self.config.host
        info.update({
            "OSC_PORT": self.port,
            "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": {
                "ACCESS": True,
                "VALUE": True,
                "RANGE": True,
                "DESCRIPTION": True,
                "TAGS": False,
                "CLIPMODE": False,
                "LISTEN": True,
                "PATH_CHANGED": True,
                "PATH_ADDED": False,
                "PATH_REMOVED": False,
                "PATH_RENAMED": False,
            },
        })
        return info
