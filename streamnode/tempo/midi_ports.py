"""MIDI input ports: opened lazily by name, read on a thread, re-opened after an unplug.

mido with the python-rtmidi backend (the `tempo` extra). Every message goes to one callback
(midi_clock.feed_messages, control/midi.MidiMapper.handle_pending); a port that is missing or goes away
is logged once per outage and tried again with backoff, and the node plays on meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from streamnode.log_limit import LogLimiter, held_text

logger = logging.getLogger(__name__)

POLL_S = 0.005  # a port is polled: mido's blocking iterator cannot see the stop Event
CONTROL_POLL_S = 0.01
"""A control surface's port is polled less often than a clock's: a knob's value waits at most
10 ms (under a frame), and every wake costs the engine thread too; MIDI clock ticks are
timestamped when read, so a clock port keeps POLL_S."""
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
_PRESENT_CHECK_S = 1.0  # while a port is quiet, how often to check it is still there


class MidiUnavailable(RuntimeError):
    """mido or its rtmidi backend is not installed."""


def _mido() -> Any:
    try:
        import mido
    except ImportError as e:
        raise MidiUnavailable(f"MIDI needs mido and python-rtmidi ({e}): pip install 'streamnode[tempo]'") from None
    return mido


def input_names() -> list[str]:
    """The MIDI input ports this machine has (empty when there is no MIDI system)."""
    try:
        return list(_mido().get_input_names())
    except MidiUnavailable:
        raise
    except Exception:  # noqa: BLE001 - no ALSA sequencer in a container, say: no ports
        return []


def resolve(name: str, names: list[str]) -> str:
    """The port `name` names exactly, or the only one containing it; ValueError listing the ports."""
    if name in names:
        return name
    matches = [n for n in names if name.lower() in n.lower()]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(names) or "none"
    raise ValueError(f"no single MIDI input matches {name!r} (inputs: {listed})")


def read_port(name: str, stop: threading.Event, on_messages: Callable[[list[Any]], None],
              poll_s: float = POLL_S) -> None:
    """Until `stop`: open `name`, pass the messages that have arrived to `on_messages` together
    (in order; a control surface keeps only a knob's newest value of them), looking for new ones
    every `poll_s` while none came; on any failure close, log once per outage, wait (backoff) and open
    again."""
    mido = _mido()
    limit = LogLimiter()
    failures = 0
    while not stop.is_set():
        port = None
        try:
            resolved = resolve(name, input_names())
            port = mido.open_input(resolved)
            if failures:
                logger.info("MIDI input %r is back", name)
            failures = 0
            next_check = time.monotonic() + _PRESENT_CHECK_S
            while not stop.is_set():
                pending = list(port.iter_pending())
                if pending:
                    on_messages(pending)
                else:
                    stop.wait(poll_s)
                    # An unplugged port may fall silent rather than fail a read: look for it.
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + _PRESENT_CHECK_S
                        if resolved not in input_names():
                            raise OSError("the device is gone (unplugged?)")
        except MidiUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - an unplugged device: the node plays on
            if failures == 0 and (held := limit(f"midi:{name}")) is not None:
                logger.warning("MIDI input %r unavailable (%s); retrying, the node plays on%s", name, e, held_text(held))
            failures += 1
            stop.wait(_BACKOFF_S[min(failures, len(_BACKOFF_S)) - 1])
        finally:
            if port is not None:
                with contextlib.suppress(Exception):  # closing a vanished device
                    port.close()
