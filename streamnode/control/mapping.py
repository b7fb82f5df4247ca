"""A fader's position → a live-parameter update: what MIDI (midi.py) and DMX (artnet.py) share.

A control surface sends positions (a CC 0..127, a DMX channel 0..255 or 0..65535); a mapping
names the live parameter by its OSC address and the range the travel covers. The address is
looked up in the OSC table (control/osc.py, derived from the schema) and the value goes through
the same `Param.convert` as an OSC message, so a MIDI knob or a desk fader can set exactly
what OSC can, with the same checks, and nothing else. Updates go on the node's ControlQueue:
latest wins per parameter, at most one value per frame whatever the surface sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamnode.control.osc import Limits, Param, lookup, param_address
from streamnode.control.updates import Update


@dataclass(frozen=True)
class Target:
    """A live parameter a fader drives, and the values at the ends of its travel."""

    address: str
    param: Param
    index: int | None
    low: float
    high: float

    @classmethod
    def of(cls, address: str, limits: Limits, low: float | None = None, high: float | None = None) -> Target:
        """Resolve `address`; ValueError when no single number, switch, choice or trigger lives there."""
        found = lookup(address, limits)
        if found is None:
            raise ValueError(f"{address!r} is not a live-parameter address (see docs/osc.md)")
        param, index = found
        if param.kind == "value" and (param.repeat != (1, 1) or len(param.args) != 1 or param.args[0].tag == "s"
                                      and not param.args[0].choices and param.finish is not bool):
            raise ValueError(f"{address} takes {param.signature}: a fader can drive a number, a switch, "
                             "a choice or a trigger")
        arg = param.args[0] if param.args else None
        lo = low if low is not None else (arg.min if arg is not None and arg.min is not None else 0.0)
        hi = high if high is not None else (arg.max if arg is not None and arg.max is not None else 1.0)
        return cls(param_address(param, index), param, index, float(lo), float(hi))

    def value(self, fraction: float) -> Any:
        """The parameter's value at `fraction` (0..1) of the travel, converted and checked like
        an OSC value (control.osc.OscReject when the range given goes beyond the parameter's)."""
        param = self.param
        if param.kind == "trigger":
            return param.convert([fraction])
        arg = param.args[0]
        if param.finish is bool:
            return param.convert([1 if fraction >= 0.5 else 0])
        if arg.choices:
            return param.convert([arg.choices[min(len(arg.choices) - 1, int(fraction * len(arg.choices)))]])
        raw = self.low + (self.high - self.low) * fraction
        return param.convert([int(round(raw)) if arg.tag == "i" else raw])

    def update(self, fraction: float, origin: str) -> Update | None:
        """The update for `fraction`; None for a trigger below its edge (only 0→1 fires)."""
        value = self.value(fraction)
        param = self.param
        if param.kind == "trigger":
            if fraction < 0.5:
                return None
            return Update(param.key or "", (self.index, param.field, None), origin=origin)
        return Update(param.key or "", (self.index, param.field, value) if self.index is not None else value,
                      origin=origin)

