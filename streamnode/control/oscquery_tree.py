"""The OSC address space as OSCQuery describes it, and what changed in it.

Everything here is derived from the address table (`osc.ADDRESSES`, itself derived from
live_params.py) and the node's `LiveState`:

- `describe()`: the tree of containers and methods. Methods are leaves (the OSC 1.0 address
  space: a method is never also a container; building a tree where one would be raises).
  Each method has `TYPE`, `ACCESS`, `DESCRIPTION`, `RANGE` where it is ranged, and `VALUE`:
  the value in force, or an empty one where nothing is (`""`, 0, one group of those for a
  list). Triggers are write-only (`ACCESS` 2, `TYPE` `N`, `VALUE` `[null]`).
- An indexed group (`/brush/N/...`, `/lora/N/...`: live_params.GROUPS) appears
  as one container per slot (`/brush/0` … `/brush/7`): every member can be written, which
  creates it; one not in use reads as empty and says so in its container's description.
- `changes()`: since the last call, the values that changed (as the OSC messages a LISTEN
  client receives) and the paths whose description changed (`PATH_CHANGED`): a member of an
  indexed group that came or went, a method whose type changed (`/t_index` from 2 to 3 steps).

No code here knows what a brush is: a new parameter or group in the schema appears by itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder

from streamnode.config import list_presets
from streamnode.control.osc import ADDRESSES, Arg, Param, param_address, value_at
from streamnode.live_params import LiveState

Reading = tuple[tuple[str, Any], ...]
"""An address's value as OSC (tag, value) pairs."""


@dataclass(frozen=True)
class Method:
    """One OSC method of the tree: its full path (prefix included), its parameter, and for a
    member of an indexed group its number and the member's container path."""

    path: str
    param: Param
    index: int | None = None
    member: str | None = None


def neutral(param: Param) -> Any:
    """The empty value of an address where nothing is in force: "" for text, 0 for a number
    (the range's bound nearest 0 where 0 is out of it), one group of those for a list."""
    zeros = tuple(_zero(a) for a in param.args)
    group: Any = zeros[0] if len(zeros) == 1 else zeros
    return [group] if param.repeat != (1, 1) else group


def _zero(arg: Arg) -> Any:
    if arg.tag == "s":
        return arg.choices[0] if arg.choices else ""
    zero = 0.0 if arg.tag == "f" else 0
    if arg.min is not None and arg.min > 0:
        zero = arg.min
    elif arg.max is not None and arg.max < 0:
        zero = arg.max
    return float(zero) if arg.tag == "f" else int(zero)


def packet(address: str, reading: Reading) -> bytes:
    """The OSC message that carries `reading` to `address` (what a LISTEN client receives)."""
    builder = OscMessageBuilder(address=address)
    for tag, value in reading:
        builder.add_arg(value, tag)
    return builder.build().dgram


@dataclass(frozen=True)
class _Layout:
    """The methods for one set of members of the groups without a slot count (most often: always)."""

    methods: tuple[Method, ...]
    single: tuple[Method, ...]  # not in an indexed group
    by_member: dict[tuple[str, int], tuple[Method, ...]]  # (group, number) → that member's methods


class AddressTree:
    """The node's address space for OSCQuery. `slots` gives each indexed group's size
    (`{"brush": 8}`); a group without one lists the members in force. `describe()` and
    `packets()` may run on any thread; `changes()` keeps what it last reported and has one
    caller (the OSC sender thread)."""

    def __init__(self, prefix: str = "", slots: Mapping[str, int] | None = None, name: str = "streamnode") -> None:
        self.prefix = prefix
        self.slots = dict(slots or {})
        self.name = name
        self._layout_cache: tuple[Any, _Layout] | None = None
        self._told: LiveState | None = None
        self._told_layout: _Layout | None = None
        self._told_readings: dict[str, Reading] = {}

    # -- the methods

    def methods(self, live: LiveState) -> tuple[Method, ...]:
        """Every method, indexed groups expanded to their slots, in the address table's order."""
        return self._layout(live).methods

    def _layout(self, live: LiveState) -> _Layout:
        groups = live.indexed()
        key = tuple((g, tuple(sorted(m))) for g, m in groups.items() if g not in self.slots)
        cached = self._layout_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        methods = []
        for p in ADDRESSES:
            if p.group is None:
                methods.append(Method(self.prefix + p.address, p))
                continue
            size = self.slots.get(p.group)
            indices = range(size) if size is not None else sorted(groups.get(p.group, {}))
            for n in indices:
                methods.append(Method(self.prefix + param_address(p, n), p, n, self._member_path(p.group, n)))
        by_member: dict[tuple[str, int], list[Method]] = {}
        for m in methods:
            if m.member is not None and m.param.group is not None and m.index is not None:
                by_member.setdefault((m.param.group, m.index), []).append(m)
        layout = _Layout(tuple(methods), tuple(m for m in methods if m.member is None),
                         {k: tuple(v) for k, v in by_member.items()})
        self._layout_cache = (key, layout)  # replaced whole: readers on other threads see either
        return layout

    def _member_path(self, group: str, n: int) -> str:
        return f"{self.prefix}/{group}/{n}"

    def reading(self, live: LiveState, method: Method) -> Reading:
        """What a method reads as: the value in force, or `neutral()` where nothing is."""
        value = value_at(live, method.param, method.index)
        return tuple(method.param.to_osc(neutral(method.param) if value is None else value))

    def readings(self, live: LiveState) -> dict[str, Reading]:
        """Every value method's reading, by full path."""
        return {m.path: self.reading(live, m) for m in self.methods(live) if m.param.kind == "value"}

    # -- the tree

    def describe(self, live: LiveState, path: str = "/") -> dict[str, Any] | None:
        """The node at `path` as OSCQuery JSON, with everything under it (`GET /` is the whole
        tree); None when there is no such node. Only what is under `path` is read."""
        path = path.rstrip("/")
        inside = path + "/"
        layout = self._layout(live)
        groups = live.indexed()
        presets: list[str] | None = None
        root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": 0, "DESCRIPTION": self.name, "CONTENTS": {}}
        containers = {"": root}
        for m in layout.methods:
            if path and m.path != path and not m.path.startswith(inside):
                continue
            if m.param.key == "preset" and presets is None:
                presets = list(list_presets())
            where, _, name = m.path.rpartition("/")
            parent = containers.get(where) or _container(containers, where)
            if name in parent["CONTENTS"]:
                raise ValueError(f"{m.path} is given twice, or is a method and a container at once")
            parent["CONTENTS"][name] = self._method_node(live, m, presets)
        for (group, n), methods in layout.by_member.items():
            container = containers.get(methods[0].member or "")
            if container is not None:
                used = n in groups.get(group, {})
                container["DESCRIPTION"] = f"{group} {n}" + ("" if used else " (not in use)")
        return find_node(root, path)

    def _method_node(self, live: LiveState, m: Method, presets: list[str] | None) -> dict[str, Any]:
        p = m.param
        description = p.description if m.index is None else re.sub(r"\bN\b", str(m.index), p.description)
        if p.kind == "trigger":
            # Write-only; `[null]` is the JSON of nil, so clients that insist on a VALUE get one.
            return {"FULL_PATH": m.path, "TYPE": "N", "ACCESS": 2, "VALUE": [None], "DESCRIPTION": description}
        reading = self.reading(live, m)
        node: dict[str, Any] = {
            "FULL_PATH": m.path,
            "TYPE": _tags(reading),
            "ACCESS": 3,
            "VALUE": [v for _, v in reading],
            "DESCRIPTION": description,
        }
        groups = len(reading) // len(p.args)
        ranges: list[dict[str, Any] | None] = [_range(a) for a in p.args] * groups
        if p.key == "preset" and presets is not None:
            ranges = [{"VALS": presets}]
        if any(r is not None for r in ranges):
            node["RANGE"] = ranges
        return node

    # -- LISTEN and PATH_CHANGED

    def packets(self, live: LiveState, under: str) -> list[tuple[str, bytes]] | None:
        """The current value of every method at or under `under`, as OSC messages; None when no
        method or container has that path."""
        under = under.rstrip("/") or "/"
        inside = "/" if under == "/" else under + "/"
        found = [m for m in self.methods(live) if m.path == under or m.path.startswith(inside)]
        if not found:
            return None
        return [(m.path, packet(m.path, self.reading(live, m))) for m in found if m.param.kind == "value"]

    def changes(self, live: LiveState) -> tuple[list[tuple[str, bytes]], list[str]]:
        """Since the last call: the (path, OSC message) of every value that changed, and the paths
        whose description changed (an indexed member that came or went, a method whose type did).

        Only what can have changed is read again: the single addresses, and the members of
        indexed groups whose state is not the same object (or equal) as before."""
        old = self._told
        if live is old:
            return [], []
        layout = self._layout(live)
        before, now = (old.indexed() if old is not None else {}), live.indexed()
        if old is None or layout is not self._told_layout:
            dirty = list(layout.methods)
            self._told_readings = {k: v for k, v in self._told_readings.items() if k in {m.path for m in dirty}}
        else:
            dirty = list(layout.single)
            for (group, n), methods in layout.by_member.items():
                if before.get(group, {}).get(n) != now.get(group, {}).get(n):
                    dirty += methods
        self._told, self._told_layout = live, layout
        told = self._told_readings
        values: list[tuple[str, bytes]] = []
        paths: list[str] = []
        for m in dirty:
            if m.param.kind != "value":
                continue
            reading = self.reading(live, m)
            was = told.get(m.path)
            told[m.path] = reading
            if old is None or was == reading:
                continue
            values.append((m.path, packet(m.path, reading)))
            if was is not None and _tags(was) != _tags(reading):
                paths.append(m.path)
        if old is not None:
            for group in _GROUPS:
                came_or_went = set(before.get(group, {})) ^ set(now.get(group, {}))
                paths[:0] = [self._member_path(group, n) for n in sorted(came_or_went)]
        return values, paths


_GROUPS = tuple(dict.fromkeys(p.group for p in ADDRESSES if p.group is not None))
"""The indexed groups that have addresses."""


def _tags(reading: Reading) -> str:
    return "".join(tag for tag, _ in reading)


def _range(arg: Arg) -> dict[str, Any] | None:
    if arg.choices:
        return {"VALS": list(arg.choices)}
    if arg.tag == "s" or (arg.min is None and arg.max is None):
        return None
    return {k: v for k, v in (("MIN", arg.min), ("MAX", arg.max)) if v is not None}


def _container(containers: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    """The container at `path`, created (with its parents) if new, its name as description; a
    method in the way is an error: the address space must be a tree. `containers` maps each
    container's path ("" for the root) to it."""
    parent_path, _, name = path.rpartition("/")
    parent = containers.get(parent_path) or _container(containers, parent_path)
    node = parent["CONTENTS"].get(name)
    if node is None:
        node = parent["CONTENTS"][name] = {"FULL_PATH": path, "ACCESS": 0, "DESCRIPTION": name, "CONTENTS": {}}
    elif "CONTENTS" not in node:
        raise ValueError(f"{path} is a method and a container at once")
    containers[path] = node
    return node


def find_node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The node at `path` in a described tree; None if there is none."""
    here: dict[str, Any] | None = tree
    for part in (p for p in path.split("/") if p):
        here = (here or {}).get("CONTENTS", {}).get(part)
        if here is None:
            return None
    return here
