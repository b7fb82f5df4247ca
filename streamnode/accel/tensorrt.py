"""TensorRT engines: build through polygraphy, cache by key, run with preallocated buffers.

Build: ONNX export (onnx_export.py) → a strongly typed network parsed by polygraphy → one
optimisation profile spanning every batch and resolution the stream may use → a serialized
engine, stored in the cache (cache.py). The network is strongly typed and the ONNX graph is
exported in the model's dtype (fp16 on CUDA), so the same code builds fp16 engines on
TensorRT 10 and on TensorRT 11, which dropped the FP16 builder flag.

Run (`TrtRunner`, TensorRT 10+ name-based API): device buffers sized for the profile's largest
shapes are allocated once; each call copies inputs into views of them, enqueues on *torch's
current CUDA stream* (so TensorRT and torch work are ordered with no extra synchronisation) and,
once a shape has run, replays a CUDA graph captured for it.

`tensorrt` and `polygraphy` are imported inside functions only: importing them needs CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamnode.accel.cache import (
    COMPONENTS,
    CONTROL_UNET,
    CacheEntry,
    EngineCache,
    EngineKey,
    EngineLoadError,
    identity_part,
    obtain_engine,
    weights_fingerprint,
)
from streamnode.accel.onnx_export import IO_NAMES, export_onnx, io_names, vae_scale
from streamnode.accel.profile import EngineProfile
from streamnode.accel.progress import DEFAULT_BUILD_SECONDS, BuildProgress, ProgressCallback

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "streamnode[tensorrt]" on a machine with an NVIDIA GPU'
MIN_TRT_MAJOR = 10
MAX_GRAPHS = 8


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot run here; the message names what to install or change."""


class EngineBuildError(RuntimeError):
    """An engine build failed. `oom` is True when it ran out of GPU memory."""

    def __init__(self, message: str, *, oom: bool = False) -> None:
        super().__init__(message)
        self.oom = oom


# -- availability --------------------------------------------------------------------------


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail): detail is the versions when usable, else one line saying what to do."""
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU visible to PyTorch (TensorRT runs on NVIDIA GPUs; {INSTALL_HINT})"
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError for a missing CUDA library
        return False, f"TensorRT is not importable ({type(e).__name__}: {str(e)[:120]}); {INSTALL_HINT}"
    try:
        import polygraphy
    except ImportError:
        return False, f"polygraphy is not installed; {INSTALL_HINT}"
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        major = MIN_TRT_MAJOR
    if major < MIN_TRT_MAJOR:
        return False, f"TensorRT {trt.__version__} is too old (need {MIN_TRT_MAJOR}+); {INSTALL_HINT}"
    return True, f"TensorRT {trt.__version__}, polygraphy {polygraphy.__version__}"


def require_tensorrt() -> None:
    ok, detail = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(detail)


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# -- keys ----------------------------------------------------------------------------------


def make_key(
    components: Any,
    component: str,
    profile: EngineProfile,
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    weights: str | None = None,
) -> EngineKey:
    """The cache key of `component` for these loaded weights on this GPU and TensorRT."""
    if weights is None:
        from streamnode.accel.onnx_export import component_module

        # The UNet with residual inputs has the UNet's weights: the component name tells them apart.
        module = component_module(components, "unet" if component == CONTROL_UNET else component)
        weights = weights_fingerprint(module)
    return EngineKey(
        component=component,
        model=str(components.identity),
        weights=weights,
        lora=identity_part(str(components.identity), "lora="),
        vae_kind="taesd" if components.tiny_vae else "full",
        profile=profile,
        dtype=str(components.dtype).removeprefix("torch."),
        runtime_version=trt_version,
        device_name=gpu_name,
        device_detail=compute_capability,
    )


def input_shapes(
    component: str, profile: EngineProfile, *, scale: int = 8, text_len: int = 77, text_dim: int = 1024,
    pooled_dim: int = 0, unet_config: Any = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every engine input for `profile`; `pooled_dim` > 0: an SDXL UNet,
    which also takes `text_embeds` (batch, pooled_dim) and `time_ids` (batch, 6). `unet_control`
    (the UNet with ControlNet residual inputs) also takes every residual, its sides following the
    latent's (`unet_config` gives their channels)."""
    lo, oh, ow, hi = profile.latent_range(scale)
    if component == CONTROL_UNET:
        from streamnode.accel.controlnet_export import residual_names, residual_shapes

        if unet_config is None:
            raise ValueError("unet_control shapes need the UNet's config")
        shapes = input_shapes("unet", profile, scale=scale, text_len=text_len, text_dim=text_dim, pooled_dim=pooled_dim)
        b = (profile.min_batch, profile.opt_batch, profile.max_batch)
        sides = ((lo, lo), (oh, ow), (hi, hi))
        per_point = [residual_shapes(unet_config, h, w) for h, w in sides]
        for i, name in enumerate(residual_names(unet_config)):
            shapes[name] = tuple((n, *point[i]) for n, point in zip(b, per_point, strict=True))  # type: ignore[assignment]
        return shapes
    if component == "unet":
        b = (profile.min_batch, profile.opt_batch, profile.max_batch)
        shapes = {
            "sample": ((b[0], 4, lo, lo), (b[1], 4, oh, ow), (b[2], 4, hi, hi)),
            "timestep": ((b[0],), (b[1],), (b[2],)),
            "encoder_hidden_states": tuple((n, text_len, text_dim) for n in b),
        }
        if pooled_dim:
            shapes["text_embeds"] = tuple((n, pooled_dim) for n in b)
            shapes["time_ids"] = tuple((n, 6) for n in b)
        return shapes  # type: ignore[return-value]
    v = profile.vae_max_batch
    if component == "vae_encoder":
        return {"images": ((1, 3, profile.min_size, profile.min_size), (v, 3, profile.opt_height, profile.opt_width),
                           (v, 3, profile.max_size, profile.max_size))}
    if component == "vae_decoder":
        return {"latents": ((1, 4, lo, lo), (v, 4, oh, ow), (v, 4, hi, hi))}
    raise ValueError(f"unknown component {component!r}")


# -- build ---------------------------------------------------------------------------------

_OOM_MARKERS = (
    "out of memory",
    "outofmemory",
    "cudaerrormemoryallocation",
    "insufficient memory",
    "failed to allocate",
    "requested amount of gpu memory",
)


def looks_like_oom(*texts: str) -> bool:
    blob = " ".join(texts).lower()
    return any(m in blob for m in _OOM_MARKERS)


def _progress_monitor(trt: Any, report: Callable[[float | None, str], None]) -> Any:
    """A `trt.IProgressMonitor` turning TensorRT's nested build phases into one fraction."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, list[Any]] = {}  # name → [parent, steps, done]

        def _fraction(self, name: str, depth: int = 0) -> float:
            parent, steps, done = self._phases[name]
            child = next((c for c, v in self._phases.items() if v[0] == name), None)
            inner = self._fraction(child, depth + 1) if child is not None and depth < 8 else 0.0
            return min((done + inner) / max(steps, 1), 1.0)

        def _emit(self, name: str) -> None:
            root = next((n for n, v in self._phases.items() if v[0] is None), None)
            report(self._fraction(root) if root is not None else None, name)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    self._phases[phase_name] = [parent_phase, num_steps, 0]
                    self._emit(phase_name)
            except Exception:  # noqa: BLE001, S110 - TensorRT calls this noexcept
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    if phase_name in self._phases:
                        self._phases[phase_name][2] = step + 1
                        self._emit(phase_name)
            except Exception:  # noqa: BLE001, S110
                pass
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    self._phases.pop(phase_name, None)
            except Exception:  # noqa: BLE001, S110
                pass

    return Monitor()


@contextlib.contextmanager
def _polygraphy_errors() -> Iterator[deque[str]]:
    """Route polygraphy's (and TensorRT's, through it) messages to logging; keep the last errors."""

    from polygraphy.logger import G_LOGGER

    errors: deque[str] = deque(maxlen=40)

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                errors.append(record.getMessage())

    old_severity = G_LOGGER.module_severity
    use_logging = hasattr(G_LOGGER, "use_python_logging_system")
    old_use_logging = bool(getattr(G_LOGGER, "use_python_logging_system", False))
    handler = Keep()
    if use_logging:
        G_LOGGER.use_python_logging_system = True
        logging.getLogger("Polygraphy").addHandler(handler)
    G_LOGGER.module_severity = G_LOGGER.WARNING
    try:
        yield errors
    finally:
        G_LOGGER.module_severity = old_severity
        if use_logging:
            logging.getLogger("Polygraphy").removeHandler(handler)
            G_LOGGER.use_python_logging_system = old_use_logging


def build_engine_bytes(
    onnx_path: Path,
    component: str,
    profile: EngineProfile,
    *,
    scale: int,
    text_len: int,
    text_dim: int,
    pooled_dim: int = 0,
    unet_config: Any = None,
    timing_cache: Path | None = None,
    workspace_bytes: int | None = None,
    on_progress: Callable[[float | None, str], None] | None = None,
) -> bytes:
    """Parse `onnx_path` and build a serialized engine covering `profile`. Raises EngineBuildError."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    shapes = input_shapes(component, profile, scale=scale, text_len=text_len, text_dim=text_dim, pooled_dim=pooled_dim,
                          unet_config=unet_config)
    trt_profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    kwargs: dict[str, Any] = {"profiles": [trt_profile], "builder_optimization_level": 3}
    if workspace_bytes:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
    if timing_cache is not None and timing_cache.is_file():
        kwargs["load_timing_cache"] = str(timing_cache)
    if on_progress is not None and hasattr(trt, "IProgressMonitor"):
        kwargs["progress_monitor"] = _progress_monitor(trt, on_progress)
    with _polygraphy_errors() as errors:
        try:
            config = CreateConfig(**kwargs)
            # Strongly typed: precision follows the ONNX graph (fp16 weights and I/O), the only mode
            # TensorRT 11 has and a supported one since 9.x.
            network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
            data = EngineBytesFromNetwork(
                network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None
            )()
        except torch.cuda.OutOfMemoryError as e:
            raise EngineBuildError(f"out of GPU memory ({e})", oom=True) from None
        except Exception as e:  # noqa: BLE001 - polygraphy raises its own exception types
            detail = " | ".join(list(errors)[-3:]) or str(e)
            raise EngineBuildError(
                f"TensorRT could not build the {component} engine: {detail[:400]}",
                oom=looks_like_oom(str(e), *errors),
            ) from None
    if not data:
        raise EngineBuildError(f"TensorRT returned no {component} engine", oom=looks_like_oom(*errors))
    return bytes(data)


@contextlib.contextmanager
def offloaded(components: Any) -> Iterator[None]:
    """Move the PyTorch modules to the CPU while TensorRT builds: its tactic search wants the memory.

    A build that would run out of memory beside a resident model usually fits without it.
    """
    device = components.device
    if device.type != "cuda":
        yield
        return
    modules = [m for m in (components.unet, components.vae, components.text_encoder,
                           getattr(components, "text_encoder_2", None)) if m is not None]
    for m in modules:
        m.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m in modules:
            m.to(device)


# -- runtime -------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("INT8", torch.int8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dtype not in table:
        raise EngineLoadError(f"engine tensor type {dtype} is not supported")
    return table[dtype]


def _trt_logger(trt: Any) -> Any:
    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=20)

        def log(self, severity: Any, msg: str) -> None:
            try:
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                    self.errors.append(msg)
                    logger.error("TensorRT: %s", msg)
                elif severity == trt.Logger.WARNING:
                    logger.debug("TensorRT: %s", msg)
            except Exception:  # noqa: BLE001, S110 - called noexcept from C++
                pass

    return Logger()


class TrtRunner:
    """One engine, one execution context, buffers allocated once, a CUDA graph per static shape.

    `__call__(*inputs)` takes the inputs in the engine's ONNX order and returns the single
    output as a fresh tensor (a clone of the static buffer, so a later call never overwrites
    what the caller holds).
    """

    def __init__(
        self,
        engine_bytes: bytes,
        *,
        component: str,
        device: torch.device,
        max_shapes: dict[str, tuple[int, ...]],
        cuda_graphs: bool = True,
        input_names: tuple[str, ...] | None = None,
    ) -> None:
        import tensorrt as trt

        self.component = component
        self.device = device
        self._trt = trt
        self._logger = _trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            errors = "; ".join(self._logger.errors)
            if looks_like_oom(errors):
                # Not the file's fault: keep it, and let the caller fall back.
                raise torch.cuda.OutOfMemoryError(f"loading the {component} engine: {errors}")
            raise EngineLoadError(
                f"TensorRT could not deserialize it ({errors or 'corrupt, or built by another TensorRT version'})"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise torch.cuda.OutOfMemoryError(
                f"no execution context for the {component} engine (not enough free GPU memory?): "
                + "; ".join(self._logger.errors)
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected_in = input_names or IO_NAMES[component][0]
        if sorted(self.inputs) != sorted(expected_in) or len(self.outputs) != 1:
            raise EngineLoadError(f"engine I/O {self.inputs}→{self.outputs} is not a {component} engine")
        self.inputs = list(expected_in)  # the seam's argument order
        self.output = self.outputs[0]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

        # Size the one allocation per tensor from the largest shapes the profile allows.
        for name in self.inputs:
            self._set_shape(name, max_shapes[name])
        max_out = tuple(self.context.get_tensor_shape(self.output))
        if any(d < 0 for d in max_out):
            raise EngineLoadError(f"could not infer the output shape for inputs {max_shapes}")
        sizes = {**{n: max_shapes[n] for n in self.inputs}, self.output: max_out}
        self._buffers = {
            n: torch.empty(int(torch.Size(s).numel()), dtype=self.dtypes[n], device=device) for n, s in sizes.items()
        }
        for name, buf in self._buffers.items():
            # Views below always start at the buffer's base, so these addresses never change.
            self.context.set_tensor_address(name, buf.data_ptr())
        self._bound: tuple[tuple[int, ...], ...] | None = None
        self._views: dict[tuple[tuple[int, ...], ...], tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._graphs: OrderedDict[tuple[tuple[int, ...], ...], torch.cuda.CUDAGraph] = OrderedDict()
        self._seen: set[tuple[tuple[int, ...], ...]] = set()
        self.cuda_graphs = cuda_graphs
        self.graph_error: str | None = None

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise ValueError(f"{self.component}: shape {tuple(shape)} for {name} is outside the engine profile")

    def _bind(self, key: tuple[tuple[int, ...], ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._bound != key:
            for name, shape in zip(self.inputs, key, strict=True):
                self._set_shape(name, shape)
            self._bound = key
        views = self._views.get(key)
        if views is None:
            out_shape = tuple(self.context.get_tensor_shape(self.output))
            ins = [self._buffers[n][: int(torch.Size(s).numel())].view(s) for n, s in zip(self.inputs, key, strict=True)]
            out = self._buffers[self.output][: int(torch.Size(out_shape).numel())].view(out_shape)
            views = self._views[key] = (ins, out)
        return views

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {self.component} enqueue failed: " + "; ".join(self._logger.errors))

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(int(d) for d in a.shape) for a in args)
        graph = self._graphs.get(key)
        # A captured graph does not read the context's shapes; only a plain enqueue needs them bound.
        ins, out = self._views[key] if graph is not None else self._bind(key)
        for dst, src in zip(ins, args, strict=True):
            dst.copy_(src)  # casts too (e.g. the engine's int64 timesteps → float32)
        stream = torch.cuda.current_stream(self.device)
        if graph is not None:
            self._graphs.move_to_end(key)
            graph.replay()
        elif self.cuda_graphs and self.graph_error is None and key in self._seen:
            self._capture(key, stream)
        else:
            self._enqueue(stream)
            self._seen.add(key)
        return out.clone()

    def _capture(self, key: tuple[tuple[int, ...], ...], current: torch.cuda.Stream) -> None:
        """Run once more on a side stream, then capture the same enqueue into a graph.

        The shape has already run once uncaptured (TensorRT may allocate on the first enqueue
        after a shape change, which a capture would not allow).
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                self._enqueue(side)
                with torch.cuda.graph(graph, stream=side):
                    self._enqueue(side)
        except Exception as e:  # noqa: BLE001 - graphs are an optimisation; plain enqueue works
            self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            logger.warning("%s: CUDA graph capture failed (%s); running without graphs", self.component, self.graph_error)
            current.wait_stream(side)
            self._enqueue(current)
            return
        current.wait_stream(side)
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)

    def close(self) -> None:
        """Release the graphs, the context and the engine (GPU memory); safe to call twice."""
        self._graphs.clear()
        self._views.clear()
        self._buffers = {}
        self.context = None
        self.engine = None


# -- orchestration -------------------------------------------------------------------------


@dataclass
class ReadyEngine:
    component: str
    runner: TrtRunner | None
    entry: CacheEntry
    built: bool
    seconds: float


def _max_shapes(
    component: str, profile: EngineProfile, scale: int, text_len: int, text_dim: int, pooled_dim: int = 0,
    unet_config: Any = None,
) -> dict[str, tuple[int, ...]]:
    shapes = input_shapes(component, profile, scale=scale, text_len=text_len, text_dim=text_dim, pooled_dim=pooled_dim,
                          unet_config=unet_config)
    return {n: s[2] for n, s in shapes.items()}


def ensure_engines(
    components: Any,
    profile: EngineProfile,
    *,
    cache: EngineCache | None = None,
    allow_build: bool = True,
    force: bool = False,
    progress: ProgressCallback | None = None,
    which: tuple[str, ...] = COMPONENTS,
    load: bool = True,
    keep_onnx: bool = False,
    cuda_graphs: bool = True,
) -> dict[str, ReadyEngine]:
    """Find or build (and, with `load`, open) an engine per component in `which`.

    Raises TensorRTUnavailable, EngineBuildError (with `.oom`), or EngineCacheError when an
    engine is missing and `allow_build` is False.
    """
    import tensorrt as trt

    require_tensorrt()
    cache = cache or EngineCache()
    device = components.device
    if device.type != "cuda":
        raise TensorRTUnavailable(f"the model is on {device}, TensorRT needs it on a CUDA GPU")
    if components.dtype == torch.float32:
        logger.warning("building float32 TensorRT engines: load the model in float16 for full speed")
    gpu_name, cc = gpu_identity(device)
    scale = vae_scale(components)
    text_len, text_dim = components.model_max_length, components.cross_attention_dim
    pooled_dim = components.conditioning.pooled_dim
    ready: dict[str, ReadyEngine] = {}
    for index, component in enumerate(which, start=1):
        key = make_key(components, component, profile, trt_version=str(trt.__version__),
                       gpu_name=gpu_name, compute_capability=cc)
        estimate = cache.estimate_seconds(key) or DEFAULT_BUILD_SECONDS.get(
            "unet" if component == CONTROL_UNET else component
        )
        start = time.perf_counter()

        def emit(stage: str, fraction: float | None = None, message: str = "",
                 _c: str = component, _i: int = index, _s: float = start, _e: float | None = estimate) -> None:
            if progress is not None:
                progress(BuildProgress(_c, _i, len(which), stage, time.perf_counter() - _s, fraction, _e, message))

        def build(_c: str = component, _k: EngineKey = key, _emit: Callable[..., None] = emit,
                  _est: float | None = estimate) -> bytes:
            work = Path(tempfile.mkdtemp(prefix=f".build-{_c}-", dir=cache.root if cache.root.exists() else None))
            try:
                _emit("export", message="exporting ONNX…")
                batch = profile.opt_batch if _c in ("unet", CONTROL_UNET) else profile.vae_max_batch
                with torch.no_grad():
                    if _c == CONTROL_UNET:
                        from streamnode.accel.controlnet_export import export_unet_with_residuals

                        report = export_unet_with_residuals(components, work / f"{_c}.onnx", batch=batch,
                                                            height=profile.opt_height, width=profile.opt_width)
                    else:
                        report = export_onnx(components, _c, work / f"{_c}.onnx", batch=batch,
                                             height=profile.opt_height, width=profile.opt_width)
                _emit("export", message=f"ONNX ready ({report.nodes_final} nodes, {report.seconds:.0f} s); "
                      f"building (estimate ~{_fmt_minutes(_est)})")
                with offloaded(components):
                    free = torch.cuda.mem_get_info(device)[0]
                    return build_engine_bytes(
                        report.path, _c, profile, scale=scale, text_len=text_len, text_dim=text_dim,
                        pooled_dim=pooled_dim, unet_config=components.unet.config,
                        timing_cache=cache.timing_cache_path(_k),
                        # Leave headroom for the builder's own weights and the CUDA context.
                        workspace_bytes=max(int(free * 0.75), 1 << 30),
                        on_progress=lambda f, phase: _emit("build", f, phase),
                    )
            finally:
                if keep_onnx:
                    logger.info("ONNX kept in %s", work)
                else:
                    shutil.rmtree(work, ignore_errors=True)

        def open_entry(entry: CacheEntry, _c: str = component) -> TrtRunner | None:
            if not load:
                return None
            # A cached engine may cover more than asked: size its buffers for what it covers.
            return TrtRunner(entry.engine_path.read_bytes(), component=_c, device=device,
                             max_shapes=_max_shapes(_c, entry.key.profile, scale, text_len, text_dim, pooled_dim,
                                                    components.unet.config),
                             cuda_graphs=cuda_graphs, input_names=engine_inputs(components, _c))

        cache.root.mkdir(parents=True, exist_ok=True)
        try:
            runner, entry, built = obtain_engine(cache, key, build=build, load=open_entry,
                                                 allow_build=allow_build, force=force)
        except BaseException as e:
            # The engines opened so far hold GPU memory the fallback backend will want.
            for item in ready.values():
                if item.runner is not None:
                    item.runner.close()
            if isinstance(e, torch.cuda.OutOfMemoryError):
                emit("failed", message="out of GPU memory")
                raise EngineBuildError(f"out of GPU memory preparing the {component} engine ({e})", oom=True) from None
            if isinstance(e, EngineBuildError):
                emit("failed", message="build failed")
            raise
        seconds = time.perf_counter() - start
        size = entry.engine_path.stat().st_size / 2**20
        if built:
            emit("done", message=f"built in {_fmt_minutes(seconds)} ({size:.0f} MiB) → {entry.directory}")
        else:
            emit("cached", message=f"cached engine {entry.directory.name} ({size:.0f} MiB), checksum ok")
        ready[component] = ReadyEngine(component, runner, entry, built, seconds)
    return ready


def engine_inputs(components: Any, component: str) -> tuple[str, ...]:
    """The engine's input names in the seam's argument order (the UNet with residuals: the
    UNet's, then every residual)."""
    if component == CONTROL_UNET:
        from streamnode.accel.controlnet_export import residual_names

        return (*io_names(components, "unet")[0], *residual_names(components.unet.config))
    return io_names(components, component)[0]


def _fmt_minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# -- seams ---------------------------------------------------------------------------------


def seam_acceptors(profile: EngineProfile, scale: int) -> dict[str, Callable[..., str | None]]:
    """Per seam: None when the engine takes these inputs, else why not (→ PyTorch for that call)."""

    def spatial(h: int, w: int, batch: int, max_batch: int) -> str | None:
        if not 1 <= batch <= max_batch:
            return f"batch {batch} is outside the engine's 1..{max_batch}"
        return profile.accepts_size(h, w)

    return {
        "unet_call": lambda x, t, e, **_: spatial(x.shape[2] * scale, x.shape[3] * scale, x.shape[0], profile.max_batch),
        "vae_encode": lambda img: spatial(img.shape[2], img.shape[3], img.shape[0], profile.vae_max_batch),
        "vae_decode": lambda z: spatial(z.shape[2] * scale, z.shape[3] * scale, z.shape[0], profile.vae_max_batch),
    }
