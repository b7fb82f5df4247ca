"""The `streamnode` command: run, demo, bench, doctor, sources, build-engines, osc, presets.

Each subcommand imports its layer only when chosen, so `streamnode osc` or `streamnode doctor`
start in a fraction of a second and never pay for torch. Typed startup errors become exit
codes here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from streamnode import __version__

EXIT_USAGE = 2


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), func)(args))

    return call


def _add_lazy(
    sub: Any, chosen: str | None, name: str, help_: str, module: str, add_args: str, command: str
) -> None:
    """Register a subcommand whose flags live in its own layer, importing that layer only if chosen."""
    parser = sub.add_parser(name, help=help_, description=help_)
    if chosen == name:
        add = getattr(importlib.import_module(module), add_args, None)
        if add is not None:
            add(parser)
    parser.set_defaults(func=_lazy(module, command))


# -- presets -------------------------------------------------------------------------------


def presets_command(args: argparse.Namespace) -> int:
    from streamnode.config import list_presets, preset_dirs

    presets = list_presets()
    width = max((len(n) for n in presets), default=0)
    for name, desc in presets.items():
        print(f"{name:<{width}}  {desc}")
    print("\nsearched: " + ", ".join(str(d) for d in preset_dirs()), file=sys.stderr)
    return 0


# -- doctor --------------------------------------------------------------------------------


def _probe(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install is exactly what doctor reports
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return True, str(getattr(mod, "__version__", "installed"))


def _vcam_backends() -> str:
    try:
        import pyvirtualcam  # noqa: F401
        from pyvirtualcam import camera
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__})"
    names = sorted(getattr(camera, "BACKENDS", {}) or {})
    return "backends: " + (", ".join(names) if names else "none")


def _midi_row() -> tuple[str, bool, str, str]:
    """mido and the MIDI inputs it sees (the names `midi.port` and `tempo.midi_clock_port` take)."""
    hint = 'pip install "streamnode[tempo]" (MIDI control and MIDI clock, docs/tempo.md)'
    try:
        from streamnode.tempo.midi_ports import MidiUnavailable, input_names

        names = input_names()
    except MidiUnavailable:
        return ("mido (MIDI)", False, "not installed", hint)
    return ("mido (MIDI)", True, "inputs: " + (", ".join(names) if names else "none found"), hint)


def doctor_command(args: argparse.Namespace) -> int:
    rows: list[tuple[str, bool, str, str]] = []

    ok, detail = _probe("torch")
    if ok:
        import torch

        cuda = torch.cuda.is_available()
        gpu = f", GPU {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA GPU (CPU only)"
        detail = f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}{gpu}"
    rows.append(("torch", ok, detail, "pip install torch (see https://pytorch.org for your CUDA)"))
    for name, module, hint in [
        ("diffusers", "diffusers", "pip install diffusers"),
        ("transformers", "transformers", "pip install transformers"),
        ("opencv", "cv2", "pip install opencv-python-headless"),
        ("python-osc", "pythonosc", "pip install python-osc"),
        ("onnxruntime", "onnxruntime", 'pip install "streamnode[onnx]"'),
        ("ndi-python", "NDIlib", 'pip install "streamnode[ndi]"'),
        ("SpoutGL", "SpoutGL", 'pip install "streamnode[spout]" (Windows only)'),
        ("websockets", "websockets", 'pip install "streamnode[oscquery]" (for --oscquery-port)'),
        ("zeroconf", "zeroconf", 'pip install "streamnode[oscquery]" (for osc.oscquery_mdns)'),
        ("Ableton Link", "link", 'pip install "streamnode[tempo]" (for tempo.source = "link")'),
    ]:
        ok, detail = _probe(module)
        rows.append((name, ok, detail, hint))
    rows.append(_midi_row())
    ok, _ = _probe("pyvirtualcam")
    vcam_hint = (
        'pip install "streamnode[vcam]"; then OBS Virtual Camera (Windows/macOS) or '
        "`modprobe v4l2loopback exclusive_caps=1` (Linux)"
    )
    rows.append(("pyvirtualcam", ok, _vcam_backends() if ok else "not installed", vcam_hint))
    # The model families the loader reads (detected from each model's own configs, models.py).
    try:
        from streamnode.diffusion.models import FAMILIES

        for family, detail in FAMILIES.items():
            rows.append((f"model:{family}", True, detail, ""))
    except ImportError as e:
        rows.append(("models", False, f"the model loader does not import ({e})", "reinstall streamnode"))
    try:
        from streamnode.accel import describe_backends

        for name, available, detail in describe_backends():
            rows.append((f"accel:{name}", available, detail, detail))
    except ImportError as e:
        rows.append(("accel", False, f"unavailable ({e})", "reinstall streamnode"))

    for name, ok, detail, hint in rows:
        mark = "ok  " if ok else "--  "
        line = f"{mark}{name:<18} {detail}"
        if not ok and hint and hint != detail:
            line += f"\n      install: {hint}"
        print(line)
    return 0


# -- bench ---------------------------------------------------------------------------------


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="preset whose model and stream settings to time")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--frames", type=int, default=30, help="timed frames (after warmup)")
    parser.add_argument("--warmup", type=int, default=5)


def bench_command(args: argparse.Namespace) -> int:
    """Engine-only frames/s on the preset's model and settings (built, accelerated and prepared
    exactly as `streamnode run` builds it), printed as JSON."""
    import numpy as np

    from streamnode.config import ConfigError, load_config
    from streamnode.diffusion.models import ModelLoadError
    from streamnode.node import build_engine

    try:
        cfg = load_config(preset=args.preset, sets=args.sets)
        eng = build_engine(cfg)
    except (ConfigError, ModelLoadError) as e:
        print(f"streamnode bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    s, m = cfg.stream, cfg.model
    eng.update(similarity_threshold=0.0)  # time every frame, never a skip
    rng = np.random.default_rng(0)
    shape = (s.frame_buffer_size, s.height, s.width, 3) if s.frame_buffer_size > 1 else (s.height, s.width, 3)
    frames = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(4)]
    for i in range(args.warmup):
        eng(frames[i % 4])
    times = []
    for i in range(args.frames):
        t0 = time.perf_counter()
        eng(frames[i % 4])
        times.append(time.perf_counter() - t0)
    times.sort()
    mean = sum(times) / len(times)
    print(json.dumps({
        "preset": args.preset, "model": m.id, "size": [s.width, s.height],
        "t_index_list": s.t_index_list, "cfg_type": s.cfg_type, "device": str(eng.components.device),
        "fps": round(s.frame_buffer_size / mean, 2), "ms_mean": round(mean * 1e3, 2),
        "ms_p50": round(times[len(times) // 2] * 1e3, 2), "frames": args.frames,
    }))
    return 0


# -- main ----------------------------------------------------------------------------------


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamnode",
        description="Headless realtime video node: stream-batch img2img between live video I/O, driven by OSC.",
    )
    parser.add_argument("--version", action="version", version=f"streamnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)

    _add_lazy(sub, chosen, "run", "run the node (source -> engine -> sinks)", "streamnode.commands.run",
              "add_run_arguments", "run_command")
    # `demo` is `run --preset demo`: every run flag works (e.g. `streamnode demo --duration 3`).
    _add_lazy(sub, chosen, "demo", "test pattern -> tiny model -> out/demo.mp4; prints fps and latency",
              "streamnode.commands.run", "add_run_arguments", "run_command")
    if chosen == "demo":
        sub.choices["demo"].set_defaults(preset="demo")
    bench = sub.add_parser("bench", help="time the engine on a preset's model; prints JSON")
    _add_bench_arguments(bench)
    bench.set_defaults(func=bench_command)
    sub.add_parser("doctor", help="what this machine can do, with install hints").set_defaults(
        func=doctor_command
    )
    _add_lazy(sub, chosen, "sources", "list NDI sources, capture devices and Spout senders", "streamnode.commands.sources",
              "add_sources_arguments", "sources_command")
    _add_lazy(sub, chosen, "build-engines", "build TensorRT engines ahead of a show", "streamnode.accel.build",
              "add_build_engines_arguments", "build_engines_command")
    _add_lazy(sub, chosen, "osc", "send one OSC message to a node, e.g. streamnode osc /prompt 'a cat'",
              "streamnode.control.osc_cli", "add_osc_arguments", "osc_command")
    sub.add_parser("presets", help="list presets with one-line descriptions").set_defaults(
        func=presets_command
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command not in ("run", "demo"):
        # `run` sets up its own logging (streamnode/logs.py): a node must never block on its output.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
