"""Acceleration backends for the stream engine: eager, torch.compile + CUDA graphs, TensorRT, OpenVINO.

The engine calls its UNet and VAE only through three seams, `unet_call(x, t, emb, *, added_cond)`,
`vae_encode(img)` and `vae_decode(z)` (`added_cond`: the model family's extra conditioning, SDXL's
pooled embedding and size ids, passed only when there is one). `accelerate()` replaces them with faster callables and
keeps the originals behind each one (`GuardedCall`), so a shape outside an engine's profile or
a fault at run time degrades to PyTorch for that call instead of stopping the show.

Backend order: `tensorrt` → `compile` (CUDA only) → `eager`; `openvino` → `eager`. `auto`
picks TensorRT when it is importable on a CUDA GPU, else compile on CUDA; without CUDA,
OpenVINO when it is installed, else eager; and says which in one line. When the chosen backend
cannot be set up (not installed, engine missing with building off, a failed build, out of
memory) the next one is used and ONE warning line says which and why.

This module imports nothing heavy at import time (`streamnode doctor` calls
`describe_backends()`; torch is imported inside the functions).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from typing import Any

from streamnode.accel.guard import GuardedCall
from streamnode.accel.progress import BuildProgress, ConsoleProgress, ProgressCallback

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SEAMS",
    "BackendFailed",
    "BuildProgress",
    "ConsoleProgress",
    "GuardedCall",
    "accelerate",
    "accelerate_with_config",
    "backend_chain",
    "describe_backends",
    "describe_seams",
    "example_calls",
    "example_inputs",
    "restore",
]

MODES = ("auto", "eager", "compile", "tensorrt", "openvino")
SEAMS = ("unet_call", "vae_encode", "vae_decode")
SELF_CHECK_RTOL = 0.05
"""An engine whose output differs from PyTorch by more than 5 % of the output's range is refused.

fp16 TensorRT vs fp16 PyTorch differ by well under 1 %; a wrong or damaged engine by ~100 %.
"""
SELF_CHECK_RTOL_BF16 = 0.2
"""The same check for a model that runs in bf16 (OpenVINO on a CPU with AMX or AVX-512-BF16).

bf16 keeps 8 mantissa bits to fp16's 11: its rounding is 8x coarser, so a sound bf16 UNet differs
from fp32 PyTorch by a few % of the range (5.4 % on a random tiny UNet), which the fp16 bound refused,
sending every such CPU back to eager. 20 % still refuses a damaged model (~100 %); the picture-level
bound for bf16 is tested in levels (tests/test_accel_openvino.py).
"""


class BackendFailed(RuntimeError):
    """A backend could not be set up; the message is the one-line reason shown to the user."""


# -- what is available ---------------------------------------------------------------------


def _cxx_compiler() -> str | None:
    for name in ("c++", "g++", "clang++", "cl"):
        if shutil.which(name):
            return name
    return None


def openvino_installed() -> bool:
    """Whether `openvino` can be imported, without importing it."""
    return importlib.util.find_spec("openvino") is not None


def describe_backends() -> list[tuple[str, bool, str]]:
    """(name, available, detail or install hint) for eager, compile, tensorrt and openvino.

    Imports torch, and OpenVINO when it is installed (to report its devices and CPU precision).
    """
    import torch

    from streamnode.accel.openvino import openvino_status
    from streamnode.accel.tensorrt import tensorrt_status

    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    rows = [("eager", True, f"PyTorch {torch.__version__} on {where}")]
    if not hasattr(torch, "compile"):
        rows.append(("compile", False, "this PyTorch has no torch.compile; install torch>=2.1"))
    elif cuda:
        has_triton = importlib.util.find_spec("triton") is not None
        rows.append((
            "compile",
            has_triton,
            "inductor + CUDA graphs" if has_triton
            else "needs Triton: pip install triton (on Windows: pip install triton-windows)",
        ))
    else:
        cxx = _cxx_compiler()
        rows.append((
            "compile",
            cxx is not None,
            f"inductor on the CPU (C++ compiler: {cxx})" if cxx
            else "needs a C++ compiler for inductor on the CPU (gcc/clang; MSVC Build Tools on Windows)",
        ))
    ok, detail = tensorrt_status()
    rows.append(("tensorrt", ok, detail))
    ok, detail = openvino_status() if openvino_installed() else (False, f"not installed; {OPENVINO_HINT}")
    rows.append(("openvino", ok, detail))
    return rows


OPENVINO_HINT = 'pip install "streamnode[openvino]"'


def backend_chain(mode: str, *, cuda: bool, tensorrt_importable: bool, openvino_importable: bool = False) -> list[str]:
    """Backends to try in order for `mode`."""
    if mode not in MODES:
        raise ValueError(f"accel mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "eager":
        return ["eager"]
    if mode == "compile":
        return ["compile", "eager"]
    if mode == "openvino":
        return ["openvino", "eager"]
    if mode == "tensorrt":
        # On a CPU, compile is not a stand-in for a GPU engine (minutes of compiling for little).
        return ["tensorrt", "compile", "eager"] if cuda else ["tensorrt", "eager"]
    if not cuda:
        # inductor on a CPU: a minute of compiling for ~1.15× (README); OpenVINO: seconds, ~2-3×.
        return ["openvino", "eager"] if openvino_importable else ["eager"]
    return ["tensorrt", "compile", "eager"] if tensorrt_importable else ["compile", "eager"]


# -- example inputs ------------------------------------------------------------------------


def example_inputs(engine: Any) -> dict[str, tuple[Any, ...]]:
    """Positional inputs of the engine's current shapes for each seam (see `example_calls`)."""
    return {seam: args for seam, (args, _) in example_calls(engine).items()}


def example_calls(engine: Any) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args, kwargs) of the engine's current shapes for each seam (warm-up, compile, self-check);
    the UNet's kwargs carry the family's `added_cond` (none for SD1/SD2)."""
    import torch

    c = engine.components
    gen = torch.Generator("cpu").manual_seed(1234)
    scale = int(getattr(c, "vae_scale_factor", 8))
    h, w = int(engine.height) // scale, int(engine.width) // scale
    rows, frames = int(engine.batch_rows), int(engine.frame_buffer_size)
    text_len = int(getattr(c, "model_max_length", 77))

    def on(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(c.device, dtype or c.dtype)

    # Made in inference mode, as the engine makes its own: torch.compile guards on that, and a
    # warm-up with ordinary tensors would be compiled for nothing and compiled again on frame 1.
    with torch.inference_mode():
        conditioning = c.conditioning
        # Packed prompt rows, unpacked the way the engine unpacks them at the seam.
        packed = on(torch.randn(rows, conditioning.tokens, c.cross_attention_dim, generator=gen))
        emb, added = conditioning.unet_inputs(packed, height=h * scale, width=w * scale)
        unet_args = (
            on(torch.randn(rows, 4, h, w, generator=gen)),
            torch.randint(100, 900, (rows,), generator=gen).to(c.device),
            emb if emb.shape[1] == text_len else emb[:, :text_len],
        )
        return {
            "unet_call": (unet_args, {} if added is None else {"added_cond": added}),
            "vae_encode": ((on(torch.rand(frames, 3, h * scale, w * scale, generator=gen) * 2 - 1),), {}),
            "vae_decode": ((on(torch.randn(frames, 4, h, w, generator=gen)),), {}),
        }


def _originals(engine: Any) -> dict[str, Callable[..., Any]]:
    out = {}
    for seam in SEAMS:
        fn = getattr(engine, seam)
        while isinstance(fn, GuardedCall):  # accelerate() called again: start from PyTorch
            fn = fn.fallback
        out[seam] = fn
    return out


def _relative_error(got: Any, ref: Any) -> float | None:
    import torch

    ref, got = ref.float(), got.float()
    if got.shape != ref.shape:
        return float("inf")
    if not bool(torch.isfinite(ref).all()):
        return None  # random or broken reference weights: nothing to judge against
    scale = max(float(ref.abs().max()), 1e-3)
    return float((got - ref).abs().max()) / scale


# -- backends ------------------------------------------------------------------------------


def _use_compile(engine: Any, originals: dict[str, Callable[..., Any]], opts: dict[str, Any]) -> dict[str, GuardedCall]:
    from streamnode.accel.compile import compile_seams

    try:
        seams = compile_seams(
            engine.components, backend=opts.get("compile_backend", "inductor"), mode=opts.get("compile_mode")
        )
        calls = example_calls(engine)
        for seam, fn in seams.items():
            args, kwargs = calls[seam]
            # Twice: the first call compiles, the second (on CUDA) captures the CUDA graph.
            for _ in range(2):
                fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - inductor/triton raise many types; all mean "not here"
        raise BackendFailed(f"torch.compile failed ({type(e).__name__}: {_first_line(e)})") from None
    return {s: GuardedCall(s, "compile", seams[s], originals[s]) for s in SEAMS}


def _use_tensorrt(engine: Any, originals: dict[str, Callable[..., Any]], opts: dict[str, Any]) -> dict[str, GuardedCall]:
    import torch

    from streamnode.accel.cache import COMPONENTS, CONTROL_UNET, SEAM_COMPONENTS, EngineCacheError
    from streamnode.accel.controlnet_export import ResidualUnetCall
    from streamnode.accel.onnx_export import PositionalUnetCall
    from streamnode.accel.profile import profile_for_engine
    from streamnode.accel.tensorrt import (
        EngineBuildError,
        TensorRTUnavailable,
        ensure_engines,
        require_tensorrt,
        seam_acceptors,
    )

    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        raise BackendFailed(str(e)) from None
    loras = getattr(engine, "loras", None)
    if loras is not None and loras.mode == "runtime" and loras.active:
        # Runtime adapters are hooks outside the UNet's weights: an engine would bake them in at
        # today's weights under a cache key that cannot tell them apart.
        raise BackendFailed('runtime LoRAs cannot be built into a TensorRT engine; set model.lora_mode = "merged"')
    components = engine.components
    profile = profile_for_engine(
        engine, min_size=opts["min_size"], max_size=opts["max_size"], max_batch=opts["max_batch"]
    )
    if (why := profile.accepts_size(int(engine.height), int(engine.width))) is not None:
        raise BackendFailed(why)
    try:
        ready = ensure_engines(
            components, profile, cache=opts.get("cache"), allow_build=opts["allow_build"], progress=opts.get("progress"),
            which=(CONTROL_UNET, *COMPONENTS[1:]) if opts.get("controlnet_inputs") else COMPONENTS,
        )
    except EngineCacheError:
        raise BackendFailed(
            "no TensorRT engine for this model, GPU and profile in the cache, and building is off; "
            "build them before the show: streamnode build-engines --preset <preset>"
        ) from None
    except EngineBuildError as e:
        if e.oom:
            raise BackendFailed(
                f"the TensorRT build ran out of GPU memory ({_first_line(e)}); close other GPU programs "
                "or narrow the profile (--max-size 768)"
            ) from None
        raise BackendFailed(_first_line(e)) from None
    except torch.cuda.OutOfMemoryError as e:
        raise BackendFailed(f"out of GPU memory loading TensorRT engines ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - export/parse errors of many types; one line for the user
        raise BackendFailed(f"TensorRT setup failed ({type(e).__name__}: {_first_line(e)})") from None

    unet = CONTROL_UNET if opts.get("controlnet_inputs") else "unet"
    unet_call = (ResidualUnetCall(ready[unet].runner, components.unet.config) if unet == CONTROL_UNET
                 else PositionalUnetCall(ready[unet].runner))
    runners = {"unet_call": unet_call, "vae_encode": ready["vae_encoder"].runner,
               "vae_decode": ready["vae_decoder"].runner}
    scale = int(getattr(components, "vae_scale_factor", 8))
    seam_components = {**SEAM_COMPONENTS, "unet_call": unet}
    # Each engine may come from a different (wider) cached profile: judge each by its own.
    accepts = {
        seam: seam_acceptors(ready[component].entry.key.profile, scale)[seam]
        for seam, component in seam_components.items()
    }
    try:
        calls = example_calls(engine)
        with torch.inference_mode():
            for seam, runner in runners.items():
                args, kwargs = calls[seam]
                # Plain run, CUDA graph capture, graph replay; the replay is checked against PyTorch.
                for _ in range(3):
                    got = runner(*args, **kwargs)
                err = _relative_error(got, originals[seam](*args, **kwargs))
                if err is not None and err > SELF_CHECK_RTOL:
                    # Drop it from the cache, so the next start builds a fresh one.
                    entry = ready[seam_components[seam]].entry
                    shutil.rmtree(entry.directory, ignore_errors=True)
                    raise BackendFailed(
                        f"the {seam} engine disagrees with PyTorch (relative error {err:.3f}); it was removed "
                        "from the cache (rebuild now: streamnode build-engines)"
                    )
                logger.debug("tensorrt %s self-check: relative error %s", seam, err)
    except BackendFailed:
        _close(runners.values())
        raise
    except Exception as e:  # noqa: BLE001
        _close(runners.values())
        raise BackendFailed(f"TensorRT engines failed their first run ({type(e).__name__}: {_first_line(e)})") from None
    return {s: GuardedCall(s, "tensorrt", runners[s], originals[s], accepts=accepts[s]) for s in SEAMS}


def _use_openvino(engine: Any, originals: dict[str, Callable[..., Any]], opts: dict[str, Any]) -> dict[str, GuardedCall]:
    import torch

    if not openvino_installed():
        raise BackendFailed(f"OpenVINO is not installed; {OPENVINO_HINT}")
    from streamnode.accel.openvino import (
        OpenVINOBackend,
        OpenVINOUnavailable,
        check_size,
        choose_target,
        describe_target,
    )

    c = engine.components
    if c.device.type != "cpu":
        raise BackendFailed(
            f"the model is on {c.device}; OpenVINO compiles from a CPU copy: use --device CPU, GPU or NPU "
            "(OpenVINO's names) or --device cpu"
        )
    if c.dtype != torch.float32:
        raise BackendFailed(
            f"the model is loaded in {str(c.dtype).removeprefix('torch.')}; load it in float32 (model.dtype = auto) "
            "and OpenVINO picks its precision (model.openvino_precision)"
        )
    if (why := check_size(int(engine.height), int(engine.width))) is not None:
        raise BackendFailed(why)
    try:
        target = choose_target(opts.get("openvino_device") or "CPU", opts.get("openvino_precision", "auto"),
                               opts.get("threads"))
    except OpenVINOUnavailable as e:
        raise BackendFailed(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a broken install or driver: one line for the user
        raise BackendFailed(f"OpenVINO cannot start ({type(e).__name__}: {_first_line(e)})") from None
    backend = OpenVINOBackend(c, target, cache=opts.get("cache"))
    rtol = SELF_CHECK_RTOL_BF16 if target.precision == "bf16" else SELF_CHECK_RTOL
    try:
        inputs = example_inputs(engine)
        if opts.get("wait", True):
            backend.prepare(inputs)
            with torch.inference_mode():
                for seam, part in backend.parts.items():
                    err = _relative_error(part(*inputs[seam]), originals[seam](*inputs[seam]))
                    if err is not None and err > rtol:
                        for entry in part.entries.values():
                            shutil.rmtree(entry.directory, ignore_errors=True)
                        raise BackendFailed(
                            f"the OpenVINO {seam} model disagrees with PyTorch (relative error {err:.3f}); "
                            "it was removed from the cache"
                        )
                    logger.debug("openvino %s self-check: relative error %s", seam, err)
        else:
            backend.queue(inputs)
    except BackendFailed:
        backend.close()
        raise
    except Exception as e:  # noqa: BLE001 - conversion/compile errors of many types; one line for the user
        backend.close()
        raise BackendFailed(f"OpenVINO setup failed ({type(e).__name__}: {_first_line(e)})") from None
    opts["detail"] = describe_target(target)
    return {
        seam: GuardedCall(seam, "openvino", part, originals[seam], accepts=part.accepts)
        for seam, part in backend.parts.items()
    }


def _close(runners: Any) -> None:
    for r in runners:
        if r is not None and hasattr(r, "close"):
            r.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


_BACKENDS: dict[str, Callable[[Any, dict[str, Callable[..., Any]], dict[str, Any]], dict[str, GuardedCall]]] = {
    "tensorrt": _use_tensorrt,
    "compile": _use_compile,
    "openvino": _use_openvino,
}


# -- entry point ---------------------------------------------------------------------------


def accelerate(
    engine: Any,
    mode: str,
    *,
    allow_build: bool = True,
    progress: ProgressCallback | None = None,
    min_size: int = 256,
    max_size: int = 1024,
    max_batch: int | None = None,
    cache: Any = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    openvino_device: str | None = None,
    openvino_precision: str = "auto",
    threads: int | None = None,
    wait: bool = True,
    controlnet_inputs: bool = False,
) -> str:
    """Replace the engine's seams with the fastest backend `mode` allows; return its name.

    `min_size`, `max_size` and `max_batch` are the TensorRT profile (`model.engine_*` in the
    config); with `allow_build=False` a missing engine is not built (the show starts on the next
    backend and the message says to run `streamnode build-engines`). `openvino_device` (CPU,
    GPU, NPU; default CPU), `openvino_precision` and `threads` (OpenVINO's CPU pool; None: every
    core) configure OpenVINO. With `wait=False` OpenVINO compiles the stream's shapes in a
    background thread and the seams run PyTorch until each is ready (for building an engine
    while another one serves). `controlnet_inputs`: the TensorRT UNet engine takes ControlNet
    residuals (one engine serves 0..N nets; accel/controlnet_export.py), so frames with a
    ControlNet stay on the GPU engine instead of falling back to PyTorch. Returns "tensorrt", "compile", "openvino" or "eager". Logs one
    line saying what is used, a warning if it is a fallback.
    """
    import torch

    from streamnode.accel.tensorrt import tensorrt_status

    cuda = engine.components.device.type == "cuda"
    trt_ok, trt_detail = tensorrt_status() if cuda else (False, "")
    ov_ok = openvino_installed()
    chain = backend_chain(mode, cuda=cuda, tensorrt_importable=trt_ok, openvino_importable=ov_ok)
    opts = {
        "allow_build": allow_build,
        "progress": progress,
        "min_size": min_size,
        "max_size": max_size,
        "max_batch": max_batch,
        "cache": cache,
        "compile_mode": compile_mode,
        "compile_backend": compile_backend,
        "openvino_device": openvino_device,
        "openvino_precision": openvino_precision,
        "threads": threads,
        "wait": wait,
        "controlnet_inputs": controlnet_inputs,
    }
    # A second call (a model switch, a mode change) starts from PyTorch and frees old engines.
    restore(engine)
    originals = _originals(engine)
    failures: list[str] = []
    chosen = "eager"
    for backend in chain:
        if backend == "eager":
            break
        try:
            seams = _BACKENDS[backend](engine, originals, opts)
        except BackendFailed as e:
            failures.append(f"{backend}: {e}")
            continue
        except torch.cuda.OutOfMemoryError as e:
            failures.append(f"{backend}: out of GPU memory ({_first_line(e)})")
            continue
        for seam, call in seams.items():
            setattr(engine, seam, call)
        # The engine's close() releases the backend's engines and sessions with it.
        engine.on_close(lambda: restore(engine))
        if hasattr(engine, "on_weights_change"):
            engine.on_weights_change(lambda structure: _weights_changed(engine, structure))
        chosen = backend
        break
    if chosen == "eager":
        for seam, fn in originals.items():
            setattr(engine, seam, fn)
    detail = f" ({opts['detail']})" if opts.get("detail") else ""
    if failures:
        logger.warning("acceleration: using %s%s, because %s", chosen, detail, "; ".join(failures))
    elif mode == "auto" and cuda and not trt_ok:
        logger.info("acceleration: %s (auto; TensorRT not used: %s)", chosen, trt_detail)
    elif mode == "auto" and not cuda and not ov_ok:
        logger.info("acceleration: %s (auto; OpenVINO not installed: %s)", chosen, OPENVINO_HINT)
    else:
        logger.info("acceleration: %s%s", chosen, detail)
    return chosen


def _weights_changed(engine: Any, structure: bool) -> None:
    """A LoRA edit changed what the UNet computes: a backend that cannot follow hands the UNet to PyTorch.

    TensorRT engines hold their weights (they are not refitted live): any LoRA change after the
    build sends the UNet to PyTorch until the node restarts with engines built for the new stack.
    torch.compile follows weights changed in place (merged mode, runtime weights) but does not see
    runtime hooks added or removed after it traced the UNet.
    """
    fn = engine.unet_call
    if not isinstance(fn, GuardedCall):
        return
    if fn.backend == "tensorrt":
        fn.stop_fast(
            "the LoRA stack changed after the TensorRT UNet was built, and TensorRT engines are not refitted "
            "live: the UNet runs in PyTorch until the node restarts with the new [[loras]] in its preset "
            "(streamnode build-engines builds that engine)"
        )
    elif fn.backend == "compile" and structure and getattr(engine.loras, "mode", "") == "runtime":
        fn.stop_fast(
            'a LoRA was added or removed in runtime mode after torch.compile traced the UNet, which cannot see '
            'it: the UNet runs eagerly from now on (model.lora_mode = "merged" keeps the compiled UNet)'
        )


def accelerate_with_config(engine: Any, model: Any, *, progress: ProgressCallback | None = None) -> str:
    """`accelerate()` with everything taken from a `ModelConfig` (accel, allow_build, engine_*,
    the OpenVINO device and precision, cpu_threads): what the node and `streamnode bench` use.

    OpenVINO's CPU threads default to the node's budget, half the cores (`node_cpu_threads`),
    like torch's: with the node's capture and sink threads on the same cores, two OpenVINO
    threads on a 2-core machine ran the demo at 2.4–5.6 fps where one thread ran it at 4.6–17.9
    (three interleaved rounds, another job loading the machine; docs/acceleration.md, "Threads").
    """
    from streamnode.config import is_openvino_device
    from streamnode.diffusion.models import node_cpu_threads

    return accelerate(
        engine,
        model.accel,
        allow_build=model.allow_build,
        progress=progress,
        min_size=model.engine_min_size,
        max_size=model.engine_max_size,
        max_batch=model.engine_max_batch,
        openvino_device=model.device if is_openvino_device(model.device) else None,
        openvino_precision=model.openvino_precision,
        threads=model.cpu_threads or node_cpu_threads(),
        controlnet_inputs=model.engine_controlnet,
    )


def restore(engine: Any) -> None:
    """Put the engine's PyTorch seams back (before switching models); releases TensorRT engines."""
    originals = _originals(engine)
    for seam in SEAMS:
        fn = getattr(engine, seam)
        if isinstance(fn, GuardedCall):
            _close([fn.fast])
        setattr(engine, seam, originals[seam])


def describe_seams(engine: Any) -> dict[str, dict[str, Any]]:
    """Per seam: backend, run-time state, PyTorch fallback calls, compile seconds (for stats and bench)."""
    from streamnode.accel.compile import CompiledCall, CudaGraphCall
    from streamnode.accel.openvino import OvComponent, OvUnet

    out: dict[str, dict[str, Any]] = {}
    from streamnode.accel.onnx_export import PositionalUnetCall

    for seam in SEAMS:
        fn = getattr(engine, seam)
        if not isinstance(fn, GuardedCall):
            out[seam] = {"backend": "eager"}
            continue
        info: dict[str, Any] = {"backend": fn.backend, "broken": fn.broken, "fallback_calls": fn.fallback_calls}
        fast = fn.fast.fn if isinstance(fn.fast, PositionalUnetCall) else fn.fast
        inner = fast.fn if isinstance(fast, CudaGraphCall) else fast
        inner = inner.plain if isinstance(inner, OvUnet) else inner
        if isinstance(inner, CompiledCall):
            info["compile_seconds"] = round(sum(inner.compile_seconds.values()), 2)
        if isinstance(inner, OvComponent):
            info["precision"] = inner.target.precision
            info["device"] = inner.target.device
            info["shapes"] = len(inner.compiled)
            info["compile_seconds"] = round(sum(inner.compiled.values()), 2)
        out[seam] = info
    return out
