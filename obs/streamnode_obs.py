"""streamnode control for OBS (Tools → Scripts → +). Needs OBS 28+ with Python scripting
(built in on Linux; on Windows and macOS set Tools → Scripts → Python Settings).

Shows the node's prompt, negative prompt, guidance, strength, seed and preset as script
properties and sends each change to the node over OSC; shows the node's state (from its
heartbeat); optionally cuts to a fallback scene when the node stops and back when it returns.

Everything except the OBS calls lives in streamnode_obs_core.py next to this file (plain
Python, tested without OBS). The timer runs on OBS's video thread (its per-frame tick; seen
in OBS 29), so nothing in it may block: the socket is non-blocking and polled every 100 ms.
Property callbacks run on the UI thread; what both touch (the outbox, the pending settings)
is guarded by one lock, never held while calling into OBS.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import obspython as obs  # only exists inside OBS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find the core next to us

from streamnode_obs_core import (  # noqa: E402 - after the path fix above
    CONTROLS,
    DEFAULT_NODE_PORT,
    DEFAULT_REPLY_PORT,
    SHIPPED_PRESETS,
    FallbackSwitcher,
    NodeLink,
    NodeSession,
    Outbox,
    SceneFallback,
    Settled,
    Trouble,
)

TICK_MS = 100
SETTLE_S = 1.0
"""Connection and fallback settings take effect once they stop changing (typing a port)."""
_HANDLER_NAME = "streamnode-obs-script-log"


class _ScriptLog(logging.Handler):
    """Our log lines in OBS's log and its Script Log window (Tools → Scripts → Script Log).

    OBS 29 opens that window over everything for each LOG_WARNING line, so only problems the
    operator must fix are warnings; routine news (node lost, node back) is info.
    """

    def emit(self, record: logging.LogRecord) -> None:
        level = obs.LOG_WARNING if record.levelno >= logging.WARNING else obs.LOG_INFO
        obs.script_log(level, self.format(record))


def _remove_log_handlers() -> None:
    # By name, not class: reloading the script defines a new _ScriptLog class, and the logger
    # (module `logging`) outlives the reload.
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)


logger = logging.getLogger("streamnode_obs")
_remove_log_handlers()
_handler = _ScriptLog()
_handler.set_name(_HANDLER_NAME)
logger.addHandler(_handler)
logger.setLevel(logging.INFO)
logger.propagate = False


class ObsFrontendScenes:
    """`Scenes` through OBS's own frontend API (no websocket needed inside OBS)."""

    def current(self) -> str | None:
        source = obs.obs_frontend_get_current_scene()
        if source is None:
            return None
        try:
            return obs.obs_source_get_name(source)
        finally:
            obs.obs_source_release(source)

    def switch(self, name: str) -> None:
        scenes = obs.obs_frontend_get_scenes()
        try:
            for source in scenes:
                if obs.obs_source_get_name(source) == name:
                    obs.obs_frontend_set_current_scene(source)
                    return
        finally:
            obs.source_list_release(scenes)
        raise LookupError(f"OBS has no scene named {name!r}")

    def names(self) -> list[str]:
        scenes = obs.obs_frontend_get_scenes()
        try:
            return [obs.obs_source_get_name(s) for s in scenes]
        finally:
            obs.source_list_release(scenes)


class _State:
    """Everything the script holds between OBS callbacks."""

    settings: Any = None
    session: NodeSession | None = None
    connection: Settled | None = None
    outbox: Outbox | None = None
    fallback_settings: Settled | None = None
    switcher: FallbackSwitcher | None = None
    scenes = ObsFrontendScenes()
    last_summary = ""
    last_condition = ""
    last_connects = 0
    value_errors: dict[str, str] = {}
    tick_trouble = Trouble()
    lock = threading.Lock()


_s = _State()


def _values(settings: Any) -> dict[str, Any]:
    """The control values from OBS settings, keyed like CONTROLS."""
    out: dict[str, Any] = {}
    for c in CONTROLS:
        if c.kind == "float":
            out[c.key] = obs.obs_data_get_double(settings, c.key)
        elif c.kind == "int":
            out[c.key] = obs.obs_data_get_int(settings, c.key)
        else:
            out[c.key] = obs.obs_data_get_string(settings, c.key)
    return out


def _connection(settings: Any) -> tuple[Any, ...]:
    return (obs.obs_data_get_string(settings, "node_host").strip() or "127.0.0.1",
            obs.obs_data_get_int(settings, "node_port"),
            obs.obs_data_get_int(settings, "reply_port"),
            obs.obs_data_get_string(settings, "prefix").strip().rstrip("/"))


def _fallback_settings(settings: Any) -> tuple[bool, str, bool]:
    return (obs.obs_data_get_bool(settings, "fallback_enabled"),
            obs.obs_data_get_string(settings, "fallback_scene").strip(),
            obs.obs_data_get_bool(settings, "fallback_restore"))


def _connect(conn: tuple[Any, ...]) -> None:
    host, port, reply_port, prefix = conn
    if _s.session is not None:
        _s.session.close()
    link = NodeLink(host, port, reply_port)
    if link.listen_error:
        logger.warning("streamnode: %s", link.listen_error)
    _s.session = NodeSession(link, prefix=prefix)
    _s.last_connects, _s.last_summary, _s.last_condition = 0, "", ""
    logger.info("streamnode: sending to %s:%d%s, replies on port %d", host, port,
                f" with prefix {prefix}" if prefix else "", link.port)


def _configure_fallback(value: tuple[bool, str, bool]) -> None:
    enabled, scene, restore = value
    if not enabled or not scene:
        _s.switcher = None
        return
    old = _s.switcher
    if old is not None and old.fallback.fallback_scene == scene:
        old.fallback.restore = restore  # same scene: keep what it knows about the outage
        return
    # A new switcher checks on its first step that OBS has the scene.
    _s.switcher = FallbackSwitcher(SceneFallback(scene, restore=restore), _s.scenes)


# -- OBS entry points ----------------------------------------------------------------------------


def script_description() -> str:
    return ("<b>streamnode</b> — live controls for a streamnode node over OSC, its status, and an "
            "optional fallback scene when the node stops.<br>Start the node first, e.g. "
            "<code>streamnode run --preset sd-turbo --source webcam://0 --sink vcam://</code>.")


def script_defaults(settings: Any) -> None:
    obs.obs_data_set_default_string(settings, "node_host", "127.0.0.1")
    obs.obs_data_set_default_int(settings, "node_port", DEFAULT_NODE_PORT)
    obs.obs_data_set_default_int(settings, "reply_port", DEFAULT_REPLY_PORT)
    obs.obs_data_set_default_string(settings, "prefix", "")
    for c in CONTROLS:
        if c.kind == "float":
            obs.obs_data_set_default_double(settings, c.key, float(c.default))
        elif c.kind == "int":
            obs.obs_data_set_default_int(settings, c.key, int(c.default))
        else:
            obs.obs_data_set_default_string(settings, c.key, str(c.default))
    obs.obs_data_set_default_bool(settings, "resend_on_restart", False)
    obs.obs_data_set_default_bool(settings, "fallback_enabled", False)
    obs.obs_data_set_default_bool(settings, "fallback_restore", True)


def script_properties() -> Any:
    props = obs.obs_properties_create()

    status = obs.obs_properties_add_text(props, "status", "Node", obs.OBS_TEXT_INFO)
    obs.obs_property_set_long_description(status, "From the node's heartbeat; press Refresh to update.")
    obs.obs_properties_add_button(props, "refresh", "Refresh status", _on_refresh)

    for c in CONTROLS:
        if c.kind == "text":
            obs.obs_properties_add_text(props, c.key, c.label, obs.OBS_TEXT_MULTILINE)
        elif c.kind == "float":
            obs.obs_properties_add_float_slider(props, c.key, c.label, c.min, c.max, c.step)
        elif c.kind == "int":
            obs.obs_properties_add_int(props, c.key, c.label, int(c.min), int(c.max), int(c.step or 1))
        else:
            p = obs.obs_properties_add_list(props, c.key, c.label, obs.OBS_COMBO_TYPE_EDITABLE,
                                            obs.OBS_COMBO_FORMAT_STRING)
            for name in SHIPPED_PRESETS:
                obs.obs_property_list_add_string(p, name, name)
    obs.obs_properties_add_button(props, "send_all", "Send all values now", _on_send_all)
    obs.obs_properties_add_bool(props, "resend_on_restart", "Send these values when the node (re)appears")

    node = obs.obs_properties_create()
    obs.obs_properties_add_text(node, "node_host", "Node host", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_int(node, "node_port", "OSC port (--osc-port)", 1, 65535, 1)
    obs.obs_properties_add_int(node, "reply_port", "Reply port (7001, or --osc-reply's)", 1, 65535, 1)
    obs.obs_properties_add_text(node, "prefix", "Address prefix (--osc-prefix)", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_group(props, "node", "Connection", obs.OBS_GROUP_NORMAL, node)

    fallback = obs.obs_properties_create()
    obs.obs_properties_add_bool(fallback, "fallback_enabled", "Cut to a fallback scene when the node stops")
    p = obs.obs_properties_add_list(fallback, "fallback_scene", "Fallback scene", obs.OBS_COMBO_TYPE_EDITABLE,
                                    obs.OBS_COMBO_FORMAT_STRING)
    for name in _s.scenes.names():
        obs.obs_property_list_add_string(p, name, name)
    obs.obs_properties_add_bool(fallback, "fallback_restore", "Cut back when the node is streaming again")
    obs.obs_properties_add_group(props, "fallback", "Fallback", obs.OBS_GROUP_NORMAL, fallback)
    return props


def script_load(settings: Any) -> None:
    _ensure(settings)
    obs.timer_add(_tick, TICK_MS)


def script_update(settings: Any) -> None:
    if _ensure(settings):
        return  # first call: the values are the baseline, not edits
    now = time.monotonic()
    assert _s.connection is not None and _s.fallback_settings is not None and _s.outbox is not None
    conn, fallback, values = _connection(settings), _fallback_settings(settings), _values(settings)
    with _s.lock:
        _s.connection.offer(conn, now)
        _s.fallback_settings.offer(fallback, now)
        _s.outbox.update(values, now)
        errors = dict(_s.outbox.errors)
    for key, error in errors.items():
        if _s.value_errors.get(key) != error:
            logger.warning("streamnode: %s not sent: %s", key, error)
    _s.value_errors = errors


def script_unload() -> None:
    obs.timer_remove(_tick)
    if _s.session is not None:
        _s.session.close()
        _s.session = None
    _remove_log_handlers()  # a reload adds a fresh one


def _ensure(settings: Any) -> bool:
    """Set up on the first callback (OBS's load/update order varies); True if it did."""
    _s.settings = settings
    if _s.session is not None:
        return False
    conn = _connection(settings)
    _s.connection = Settled(conn, SETTLE_S)
    _connect(conn)
    _s.outbox = Outbox()
    _s.outbox.baseline(_values(settings))
    _s.fallback_settings = Settled(_fallback_settings(settings), SETTLE_S)
    _configure_fallback(_s.fallback_settings.value)
    return True


def _tick() -> None:
    if _s.session is None or _s.outbox is None or _s.connection is None or _s.fallback_settings is None:
        return
    now = time.monotonic()
    try:
        with _s.lock:
            new_connection = _s.connection.value if _s.connection.take(now) else None
            new_fallback = _s.fallback_settings.value if _s.fallback_settings.take(now) else None
        if new_connection is not None:
            _connect(new_connection)
        if new_fallback is not None:
            _configure_fallback(new_fallback)
        session, outbox = _s.session, _s.outbox
        session.tick(now)
        monitor = session.monitor
        if monitor.connects != _s.last_connects:
            _s.last_connects = monitor.connects
            if _s.settings is not None and obs.obs_data_get_bool(_s.settings, "resend_on_restart"):
                logger.info("streamnode: the node (re)appeared: sending it the panel's values")
                values = _values(_s.settings)
                with _s.lock:
                    outbox.resend_all(values, now)
        with _s.lock:
            due = outbox.due(now, monitor)
        for address, args in due:
            session.send(address, *args)
        condition = monitor.condition(now)
        if condition != _s.last_condition:  # state changes, not every second of silence
            logger.info("streamnode: %s", condition)
            _s.last_condition = condition
        if _s.switcher is not None:
            _s.switcher.step(monitor, now)
        summary = monitor.summary(now)
        if summary != _s.last_summary and _s.settings is not None:
            obs.obs_data_set_string(_s.settings, "status", summary)
        _s.last_summary = summary
        _s.tick_trouble.clear("the OBS timer works again")
    except Exception as e:  # a timer that raises is never called again: log (once) and keep ticking
        _s.tick_trouble.report(f"error in the OBS timer (still running): {type(e).__name__}: {e}", exc_info=True)


def _on_refresh(props: Any, prop: Any) -> bool:
    # The label is "Node" beside the setting's value: write the value, and let OBS redraw.
    if _s.settings is not None and _s.session is not None:
        _s.last_summary = _s.session.monitor.summary(time.monotonic())
        obs.obs_data_set_string(_s.settings, "status", _s.last_summary)
    return True


def _on_send_all(props: Any, prop: Any) -> bool:
    if _s.outbox is not None and _s.settings is not None:
        values = _values(_s.settings)
        with _s.lock:
            _s.outbox.resend_all(values, time.monotonic())
    return False
