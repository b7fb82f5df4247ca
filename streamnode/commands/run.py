"""`streamnode run` (and `demo`): flags → validated config → logging → a node, signals, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

from streamnode.config import ConfigError, ModelConfig, NodeConfig, RuntimeConfig, SourceConfig, load_config
from streamnode.logs import LogSetupError, start_logging
from streamnode.node import EXIT_FAILURE, EXIT_USAGE, Node, StartupError

logger = logging.getLogger(__name__)


def _choices(model: type, field: str) -> tuple[str, ...]:
    """The allowed values of a Literal config field: the flag offers what the config accepts."""
    return get_args(model.model_fields[field].annotation)  # type: ignore[attr-defined]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `streamnode run`. Short flags override the preset; `--set` overrides both."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", help="preset name (`streamnode presets` lists them)")
    g.add_argument("--config", metavar="FILE", help="a TOML file in preset format, instead of --preset")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set stream.guidance_scale=1.4 (repeatable)")
    g = parser.add_argument_group("video")
    g.add_argument("--source", help="test://moving, file://clip.mp4, webcam://0, ndi://Name, spout://Name, shm://name")
    g.add_argument("--sink", dest="sinks", action="append", metavar="URI",
                   help="output (repeatable; replaces the preset's): vcam://, ndi://Name, spout://Name, "
                        "shm://name, file://out.mp4, http://127.0.0.1:8080, null://")
    g.add_argument("--fit", choices=_choices(SourceConfig, "fit"), help="how sources fit the output size")
    g.add_argument("--width", type=int, help="output width (multiple of 8)")
    g.add_argument("--height", type=int, help="output height (multiple of 8)")
    g.add_argument("--prompt", help="the prompt to start with")
    g.add_argument("--no-drop", action="store_true", default=None,
                   help="process every frame in order (file renders), instead of always the newest")
    g.add_argument("--once", action="store_true", default=None, help="play a file source once, then stop")
    g.add_argument("--duration", type=float, metavar="S", help="stop S seconds after the first output frame")
    g.add_argument("--forever", action="store_true", default=None,
                   help="run until stopped (Ctrl+C), even when the preset sets a duration")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N output frames")
    g.add_argument("--ndi-discovery", metavar="ADDR[,ADDR]",
                   help="extra NDI discovery addresses, for networks without mDNS (e.g. 127.0.0.1)")
    g = parser.add_argument_group("engine")
    g.add_argument("--engine", choices=_choices(RuntimeConfig, "engine"),
                   help="stream: diffusion (default); passthrough: no model, input resized to the output")
    g.add_argument("--model", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    g.add_argument("--accel", choices=_choices(ModelConfig, "accel"))
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps; with --accel openvino: CPU, GPU, GPU.N, NPU")
    g = parser.add_argument_group("control (OSC is on unless --no-osc; a preset may turn it off, and "
                                  "any of --osc-host/--osc-port/--oscquery-port turns it back on)")
    g.add_argument("--osc-host", help="address to listen on for OSC (default 127.0.0.1)")
    g.add_argument("--osc-port", type=int, help="UDP port for OSC (default 7000; 0 picks one)")
    g.add_argument("--osc-reply", metavar="HOST:PORT", help="where replies and status go")
    g.add_argument("--osc-prefix", metavar="/NAME", help="address prefix, e.g. /vj1")
    g.add_argument("--osc-allow", metavar="CIDR[,CIDR]", help="networks allowed to send OSC")
    g.add_argument("--no-osc", action="store_true", default=None, help="no OSC server")
    g.add_argument("--oscquery-port", type=int, help="serve OSCQuery (HTTP, and LISTEN over a websocket) on this port; needs streamnode[oscquery]")
    g.add_argument("--allow-model-switch", action="store_true", default=None, help="allow /model over OSC")
    g = parser.add_argument_group("logging (never blocks the node: output nobody reads is dropped and counted)")
    g.add_argument("--log-level", choices=_choices(RuntimeConfig, "log_level"))
    g.add_argument("--log-file", metavar="FILE",
                   help="also write the log to FILE, rotated by size (FILE.1 … FILE.3, 10 MB each; "
                        "runtime.log_file_max_mb, runtime.log_file_backups)")
    g.add_argument("--log-format", choices=_choices(RuntimeConfig, "log_format"),
                   help="json: one JSON object per line, for supervisors and log collectors")
    g.add_argument("--quiet", action="store_true", default=None,
                   help="write nothing to stdout or stderr (for launchers that do not read them); "
                        "with --log-file the log goes there")


_FLAG_KEYS = {
    "source": "source.uri", "sinks": "sinks", "fit": "source.fit", "width": "stream.width",
    "height": "stream.height", "prompt": "stream.prompt", "no_drop": "runtime.no_drop", "duration": "runtime.duration",
    "max_frames": "runtime.max_frames", "ndi_discovery": "source.ndi_discovery", "engine": "runtime.engine",
    "model": "model.id", "accel": "model.accel", "device": "model.device", "osc_host": "osc.host",
    "osc_port": "osc.port", "osc_reply": "osc.reply", "osc_prefix": "osc.prefix", "osc_allow": "osc.allow",
    "oscquery_port": "osc.oscquery_port", "allow_model_switch": "osc.allow_model_switch",
    "log_level": "runtime.log_level", "log_file": "runtime.log_file", "log_format": "runtime.log_format",
}
_OSC_ON_FLAGS = ("osc_host", "osc_port", "oscquery_port")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """NodeConfig from `run` flags: preset or --config file, then short flags, then --set."""
    overrides = {key: getattr(args, name) for name, key in _FLAG_KEYS.items() if getattr(args, name, None) is not None}
    if getattr(args, "once", None):
        overrides["source.loop"] = False
    asked_osc = [f"--{n.replace('_', '-')}" for n in _OSC_ON_FLAGS if getattr(args, n, None) is not None]
    if getattr(args, "no_osc", None):
        if asked_osc:
            raise ConfigError(f"--no-osc with {' '.join(asked_osc)}: give one or the other")
        overrides["osc.enabled"] = False
    elif asked_osc:
        # Asking for a port is asking for OSC, whatever the preset says.
        overrides["osc.enabled"] = True
    if getattr(args, "forever", None):
        if getattr(args, "duration", None) is not None or getattr(args, "max_frames", None) is not None:
            raise ConfigError("--forever with --duration or --max-frames: give one or the other")
        overrides["runtime.duration"] = None
        overrides["runtime.max_frames"] = None
    return load_config(preset=getattr(args, "preset", None), sets=getattr(args, "sets", None) or [],
                       overrides=overrides, preset_file=getattr(args, "config", None))


@contextlib.contextmanager
def shutdown_signals(stop: threading.Event, on_force: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`; a second one calls `on_force` (a moment to write the log out),
    then exits at once. Old handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread; the caller stops us instead
        return

    def handle(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # The graceful path is stuck: leave now. The OS releases devices and sockets, and
            # the resource tracker removes our shared-memory segments.
            logger.warning("%s again: forced exit", name)
            if on_force is not None:
                on_force()
            os._exit(130)
        logger.info("%s: shutting down (again to force)", name)
        stop.set()

    signums = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
    previous = {s: signal.signal(s, handle) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


FORCED_EXIT_LOG_S = 0.3  # how long a forced exit gives the log outputs that still move


def run_command(args: argparse.Namespace) -> int:
    """`streamnode run`: exit 0 when stopped or done, 1 when the node cannot run, 2 for a bad config."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"streamnode run: {e}", file=sys.stderr)
        return EXIT_USAGE
    _start_resource_tracker()
    rt = config.runtime
    try:
        logs = start_logging(
            rt.log_level, rt.log_format, console=not getattr(args, "quiet", None),
            file=Path(rt.log_file).expanduser() if rt.log_file else None,
            file_max_bytes=int(rt.log_file_max_mb * 2**20), file_backups=rt.log_file_backups,
        )
    except LogSetupError as e:
        print(f"streamnode run: {e}", file=sys.stderr)
        return EXIT_USAGE
    with logs:
        node = Node(config, freeze_heap=True)  # this process is the node's: no full collection stops it (node/heap.py)
        stop = threading.Event()
        with shutdown_signals(stop, on_force=lambda: logs.drain(FORCED_EXIT_LOG_S)):
            try:
                code = node.run(stop)
            except StartupError as e:
                print(f"streamnode run: {e}", file=sys.stderr)
                return EXIT_FAILURE
        # Through descriptor 2, so it reaches the log file too and can never block.
        print(f"streamnode: {node.summary()}", file=sys.stderr)
        busy = node.busy_threads()
    if busy:
        # An engine call that outlived the deadline (a slow CPU model): its transports are closed
        # already, and letting the interpreter finalise under a running torch op aborts the
        # process. Leave now, with the exit code we mean (the log is written out, or stuck).
        os._exit(code)
    # The interpreter's last garbage collections walk torch's and transformers' whole object
    # graph: seconds, on a busy CPU, after everything is closed. Nothing left needs them.
    gc.freeze()
    return code


def _start_resource_tracker() -> None:
    """Start Python's resource tracker before the log takes over descriptors 1 and 2.

    Children inherit those descriptors, and this one outlives us: when we die without removing
    our shared-memory segments it removes them and says so on stderr. It must say so on the real
    stderr, not on the log's pipe, which ends with this process.
    """
    if os.name == "posix":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
