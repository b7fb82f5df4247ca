"""streamnode control for OBS (Tools → Scripts → +). Needs OBS 28+ with Python set up.

Shows the node's prompt, negative prompt, guidance, strength, seed and preset as script
properties and sends each change to the node over OSC; shows the node's state (from its
heartbeat); optionally cuts to a fallback scene when the node stops and back when it returns.

Everything except the OBS calls lives in streamnode_obs_core.py next to this file (plain
Python, tested without OBS). Timers run on OBS's UI thread, so nothing here may block: the
socket is non-blocking and polled every 100 ms.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import obspython as obs  # only exists inside OBS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find the core next to us

from streamnode_obs_core import (  # noqa: E402 - after the path fix above
    CONTROLS,
    DEFAULT_NODE_PORT,
    DEFAULT_REPLY_PORT,
    SHIPPED_PRESETS,
    NodeLink,
    NodeSession,
    Outbox,
    SceneFallback,
    fallback_tick,
)

TICK_MS = 100
CONNECTION_KEYS = ("node_host", "node_port", "reply_port", "prefix")
FALLBACK_KEYS = ("fallback_enabled", "fallback_scene", "fallback_restore")


class _ScriptLog(logging.Handler):
    """Our log lines in OBS's Script Log window (Tools → Scripts → Script Log)."""

    def emit(self, record: logging.LogRecord) -> None:
        level = obs.LOG_WARNING if record.levelno >= logging.WARNING else obs.LOG_INFO
        obs.script_log(level, self.format(record))


logger = logging.getLogger("streamnode_obs")
if not any(isinstance(h, _ScriptLog) for h in logger.handlers):
    logger.addHandler(_ScriptLog())
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
    connection: tuple[Any, ...] | None = None
    outbox: Outbox | None = None
    fallback: SceneFallback | None = None
    scenes = ObsFrontendScenes()
    last_summary = ""
    last_connects = 0


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


def _connect(settings: Any) -> None:
    host, port, reply_port, prefix = conn = _connection(settings)
    if _s.session is not None:
        _s.session.close()
    link = NodeLink(host, port, reply_port)
    if link.listen_error:
        logger.warning("streamnode: %s", link.listen_error)
    _s.session = NodeSession(link, prefix=prefix)
    _s.connection = conn
    logger.info("streamnode: sending to %s:%d%s, replies on port %d", host, port,
                f" with prefix {prefix}" if prefix else "", link.port)


def _configure_fallback(settings: Any) -> None:
    scene = obs.obs_data_get_string(settings, "fallback_scene").strip()
    if not obs.obs_data_get_bool(settings, "fallback_enabled") or not scene:
        _s.fallback = None
        return
    restore = obs.obs_data_get_bool(settings, "fallback_restore")
    old = _s.fallback
    if old is None or old.fallback_scene != scene or old.restore != restore:
        _s.fallback = SceneFallback(scene, restore=restore)


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
    if _connection(settings) != _s.connection:
        _connect(settings)
    _configure_fallback(settings)
    assert _s.outbox is not None
    _s.outbox.update(_values(settings), time.monotonic())
    for key, error in _s.outbox.errors.items():
        logger.warning("streamnode: %s not sent: %s", key, error)


def script_unload() -> None:
    obs.timer_remove(_tick)
    if _s.session is not None:
        _s.session.close()
        _s.session = None


def _ensure(settings: Any) -> bool:
    """Set up on the first callback (OBS's load/update order varies); True if it did."""
    _s.settings = settings
    if _s.session is not None:
        return False
    _connect(settings)
    _s.outbox = Outbox()
    _s.outbox.baseline(_values(settings))
    _configure_fallback(settings)
    return True


def _tick() -> None:
    session, outbox = _s.session, _s.outbox
    if session is None or outbox is None:
        return
    now = time.monotonic()
    try:
        session.tick(now)
        monitor = session.monitor
        if monitor.connects != _s.last_connects:
            _s.last_connects = monitor.connects
            logger.info("streamnode: the node is answering")
            if _s.settings is not None and obs.obs_data_get_bool(_s.settings, "resend_on_restart"):
                outbox.resend_all(_values(_s.settings), now)
        for address, args in outbox.due(now):
            session.send(address, *args)
        if _s.fallback is not None:
            fallback_tick(_s.fallback, monitor, _s.scenes, now)
        summary = monitor.summary(now)
        if summary == _s.last_summary:
            return
        if summary.split(" · ")[0] != _s.last_summary.split(" · ")[0]:
            logger.info("streamnode: %s", summary)  # log state changes, not every fps wiggle
        _s.last_summary = summary
        if _s.settings is not None:
            obs.obs_data_set_string(_s.settings, "status", summary)
    except Exception:  # a timer that raises is never called again: log and keep ticking
        logger.exception("streamnode: error in the OBS timer (still running)")


def _on_refresh(props: Any, prop: Any) -> bool:
    status = obs.obs_properties_get(props, "status")
    if status is not None:
        obs.obs_property_set_description(status, f"Node: {_s.last_summary or 'no reply yet'}")
    return True  # redraw the properties


def _on_send_all(props: Any, prop: Any) -> bool:
    if _s.outbox is not None and _s.settings is not None:
        _s.outbox.resend_all(_values(_s.settings), time.monotonic())
    return False
