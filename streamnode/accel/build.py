"""`streamnode build-engines`: build the TensorRT engines of a preset ahead of a show.

    streamnode build-engines --preset sd-turbo [--set KEY=VALUE ...]
                             [--min-size 256 --max-size 1024] [--max-batch N] [--force] [--keep-onnx]

Builds (or finds, checksum-verified, in the cache) the UNet, VAE-encoder and VAE-decoder
engines whose profile covers the preset: every resolution in min..max size, every cfg mode at
the preset's steps or fewer, its frame_buffer_size. Progress and time estimates go to stderr;
the summary goes to stdout. A node started later with the same preset (and `--set` values that
stay within the range) finds these engines and never builds during the show.

Exit codes: 0 ready; 1 a build failed; 2 bad arguments or config; 3 TensorRT cannot run here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def add_build_engines_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `build-engines` flags to `parser` (the subcommand's parser)."""
    parser.add_argument("--preset", default="sd-turbo", help="preset whose engines to build (default: sd-turbo)")
    parser.add_argument("--config", dest="preset_file", default=None, help="a preset TOML file instead of --preset")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.id=stabilityai/sd-turbo (repeatable)",
    )
    parser.add_argument("--min-size", type=int, default=None, help="smallest width/height the engines accept (default 256)")
    parser.add_argument("--max-size", type=int, default=None, help="largest width/height the engines accept (default 1024)")
    parser.add_argument(
        "--max-batch", type=int, default=None,
        help="UNet rows per call the engine accepts (default 2·steps·frame_buffer_size: every cfg mode)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a valid cached engine exists")
    parser.add_argument("--keep-onnx", action="store_true", help="keep the exported ONNX files (for debugging)")


def _say(msg: str) -> None:
    print(f"build-engines: {msg}", file=sys.stderr)


def build_engines_command(args: argparse.Namespace) -> int:
    """Run `build-engines` with parsed `args`; returns the process exit code."""
    from streamnode.config import ConfigError, load_config

    overrides: dict[str, Any] = {}
    if args.min_size is not None:
        overrides["model.engine_min_size"] = args.min_size
    if args.max_size is not None:
        overrides["model.engine_max_size"] = args.max_size
    if args.max_batch is not None:
        overrides["model.engine_max_batch"] = args.max_batch
    try:
        config = load_config(
            preset=None if getattr(args, "preset_file", None) else args.preset,
            preset_file=getattr(args, "preset_file", None),
            sets=list(args.sets or []),
            overrides=overrides,
        )
    except ConfigError as e:
        _say(str(e))
        return EXIT_USAGE

    from streamnode.accel.profile import ProfileError, profile_for_config

    try:
        profile = profile_for_config(config)
    except ProfileError as e:
        _say(str(e))
        return EXIT_USAGE

    if config.loras and config.model.lora_mode != "merged":
        _say('runtime LoRAs cannot be built into a TensorRT engine; set model.lora_mode = "merged" in the preset')
        return EXIT_USAGE

    # Check before loading gigabytes of weights: without TensorRT on a CUDA GPU nothing can be built.
    from streamnode.accel.tensorrt import tensorrt_status

    ok, detail = tensorrt_status()
    if not ok:
        _say(f"cannot build TensorRT engines here: {detail}")
        return EXIT_UNAVAILABLE
    if config.model.device not in ("auto",) and not config.model.device.startswith("cuda"):
        _say(f"model.device = {config.model.device}: TensorRT engines are built on a CUDA GPU (--set model.device=cuda)")
        return EXIT_USAGE

    from streamnode.accel.cache import EngineCache
    from streamnode.accel.progress import ConsoleProgress
    from streamnode.accel.tensorrt import EngineBuildError, ensure_engines
    from streamnode.diffusion.models import ModelLoadError, load_components

    model = config.model
    _say(
        f"{model.id}: engines for {profile.min_size}–{profile.max_size} px, UNet batch 1–{profile.max_batch}, "
        f"VAE batch 1–{profile.vae_max_batch}, tuned for {profile.opt_width}x{profile.opt_height} "
        f"batch {profile.opt_batch}"
    )
    try:
        components = load_components(
            model.id,
            device="cuda" if model.device == "auto" else model.device,
            dtype=model.dtype,
            use_tiny_vae=model.use_tiny_vae,
            tiny_vae=model.tiny_vae,
            lcm_lora=model.lcm_lora,
        )
    except ModelLoadError as e:
        _say(str(e))
        return EXIT_FAILED
    if config.loras:
        # The preset's LoRAs, merged exactly as the node merges them before it accelerates: the
        # engine is built for these weights (they are part of its cache key).
        from streamnode.diffusion.lora import LoraStack

        stack = LoraStack(components.unet, mode="merged", max_loras=config.runtime.max_loras)
        for index, lora in enumerate(config.loras):
            try:
                stack.edit(index, lora.model_dump())
            except ValueError as e:
                _say(f"lora {index}: {e}")
                return EXIT_FAILED
        _say(f"{len(config.loras)} LoRA(s) merged into the UNet")
    cache = EngineCache()
    start = time.perf_counter()
    try:
        ready = ensure_engines(
            components, profile, cache=cache, allow_build=True, force=args.force,
            progress=ConsoleProgress(), load=True, keep_onnx=args.keep_onnx,
        )
    except EngineBuildError as e:
        hint = " (out of GPU memory: close other GPU programs, or narrow the range with --max-size 768)" if e.oom else ""
        _say(f"{e}{hint}")
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - export/parse faults: one line, not a traceback
        _say(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        logger.debug("build-engines failure", exc_info=True)
        return EXIT_FAILED
    for item in ready.values():
        if item.runner is not None:
            item.runner.close()
    total = time.perf_counter() - start
    for name, item in ready.items():
        state = f"built in {item.seconds:.0f} s" if item.built else "cached (checksum ok)"
        print(f"{name:12s} {state:24s} {item.entry.engine_path}")
    print(f"ready in {total:.0f} s; cache: {cache.root}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m streamnode.accel.build`) until the CLI wires the subcommand."""
    parser = argparse.ArgumentParser(prog="streamnode build-engines", description=__doc__.split("\n\n")[0])
    add_build_engines_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return build_engines_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
