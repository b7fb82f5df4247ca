"""OpenVINO: the UNet and both VAE halves compiled for a CPU, an Intel GPU or an NPU.

Conversion: OpenVINO's own PyTorch converter traces the very modules the ONNX export uses
(`onnx_export.component_module`: the seams' math, latent scaling included), at the engine's
resolution, once per model, component and weights: the converted model is remembered by the
process and kept on disk as IR (openvino_ir.py) for the processes after it.

Compilation: one *static* model per input shape. The tiny UNet at 256² ran 2× faster static
than with dynamic axes on this project's CPU, and an NPU takes static shapes only. The stream's
shapes are fixed between live changes (F, the resolution and the cfg type are frozen; only the
UNet rows change, with the steps or the number of brushes), so a handful of models cover a show.
Precision: bf16 on CPUs whose OpenVINO plugin reports BF16 (AMX or AVX-512-BF16), fp32 on
other CPUs; on a GPU or NPU the device's own default (fp16). The image ports are NHWC, so the
engine's channels-last images go in and come out without a copy; the timestep port takes the
engine's int64 rows.

Cache: every compiled model is exported to the engine cache (cache.py) under a key with the
model and weights, the exact shapes, the precision, the OpenVINO version and the device; written
atomically with a checksum, imported in a fraction of the compile time at the next start, and
removed and recompiled when it is corrupt or OpenVINO refuses it.

When compiling happens: `prepare()` compiles (or imports) the stream's current shapes before
the first frame. A shape that appears during a show (steps changed live, a brush added) is
refused by `accepts()`, so that call runs in PyTorch (GuardedCall), and a background thread
compiles it; the next call of that shape runs in OpenVINO. The engine thread never compiles.

`openvino` is imported inside functions only: importing streamnode, the CLI and `doctor`'s
other rows never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamnode.accel.cache import (
    CONTROL_UNET,
    SEAM_COMPONENTS,
    CacheEntry,
    EngineCache,
    EngineKey,
    EngineLoadError,
    identity_part,
    obtain_engine,
    weights_fingerprint,
)
from streamnode.accel.onnx_export import component_module, vae_scale
from streamnode.accel.openvino_ir import IrStore
from streamnode.accel.profile import SIZE_MULTIPLE, EngineProfile

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "streamnode[openvino]"'
PRECISIONS = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
"""OpenVINO's inference precision names → the cache key's dtype names."""

# Ports in NHWC (the engine's channels-last memory, read as-is); the rest stay as the graph has them.
_NHWC_INPUTS = {"vae_encoder": (0,), "vae_decoder": (0,)}
_NHWC_OUTPUTS = {"vae_decoder": (0,)}

Shapes = tuple[tuple[int, ...], ...]


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO cannot run here (not installed, no such device); the message says what to do."""


# -- availability and target ---------------------------------------------------------------


def openvino_status() -> tuple[bool, str]:
    """(usable, detail): OpenVINO's version, devices and CPU precision, else the install line."""
    try:
        import openvino as ov
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError for a broken native library
        return False, f"OpenVINO is not installed ({type(e).__name__}); {INSTALL_HINT}"
    try:
        core = ov.Core()
        devices = list(core.available_devices)
        cpu = choose_target("CPU", core=core) if "CPU" in devices else None
    except Exception as e:  # noqa: BLE001
        return False, f"OpenVINO {ov.__version__} cannot start ({type(e).__name__}: {str(e)[:120]})"
    parts = [f"OpenVINO {_version(ov)}: devices {', '.join(devices) or 'none'}"]
    if cpu is not None:
        parts.append(f"CPU {cpu.describe()}")
    return True, "; ".join(parts)


def _version(ov: Any) -> str:
    return str(ov.__version__).split("-")[0]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class OvTarget:
    """Where and how the models are compiled: an OpenVINO device, a precision and a thread count."""

    device: str
    """OpenVINO's spelling: CPU, GPU, GPU.1, NPU."""
    full_name: str
    precision: str
    """OpenVINO's inference precision: bf16, f16 or f32."""
    reason: str
    """Why this precision, for the log and `doctor`."""
    capabilities: str
    version: str
    threads: int | None = None
    """INFERENCE_NUM_THREADS on a CPU (None: OpenVINO's default, every core)."""

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"({self.full_name}) {self.precision} ({self.reason}){threads}"

    def config(self) -> dict[str, Any]:
        """Properties for compile_model / import_model."""
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            props["INFERENCE_PRECISION_HINT"] = self.precision
            props["NUM_STREAMS"] = 1
            # Pinned, a second compiled model (a model switch, a shape compiled in the background)
            # builds its graph on the very core the serving model's stream is pinned to: each
            # UNet call took twice as long while a cached UNet was imported beside it, and a
            # niced import starved for 33-43 s with the other core idle. Unpinned, the calls kept
            # their time; alone, pinned and unpinned calls ran alike (docs/acceleration.md, "Threads").
            props["ENABLE_CPU_PINNING"] = False
            if self.threads:
                props["INFERENCE_NUM_THREADS"] = int(self.threads)
        elif self.reason == "asked for":
            # A GPU or NPU left on auto keeps its own default (fp16): an NPU may not take the hint.
            props["INFERENCE_PRECISION_HINT"] = self.precision
        return props


def choose_target(
    device: str = "CPU", precision: str = "auto", threads: int | None = None, *, core: Any = None
) -> OvTarget:
    """The target for an OpenVINO `device`; `precision` auto, bf16, fp16 or fp32.

    auto on a CPU: bf16 when OpenVINO reports BF16 for it (AMX or AVX-512-BF16), else fp32. On a
    GPU or an NPU: fp16, their native precision. Raises OpenVINOUnavailable for a device
    OpenVINO does not see, or a precision the device cannot run.
    """
    import openvino as ov

    core = core or ov.Core()
    available = list(core.available_devices)
    # "GPU" names the first GPU even when OpenVINO lists GPU.0 and GPU.1.
    if device not in available and not any(d.startswith(f"{device}.") for d in available):
        raise OpenVINOUnavailable(
            f"OpenVINO sees no {device} here (devices: {', '.join(available) or 'none'}); "
            "use --device CPU, or install the device's driver"
        )
    try:
        full_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001 - a plugin without the property
        full_name = device
    try:
        caps = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001
        caps = []
    has_bf16 = "BF16" in caps
    kind = device.split(".")[0]
    want = {"auto": "auto", "bf16": "bf16", "fp16": "f16", "fp32": "f32"}[precision]
    if kind == "CPU":
        flags = _cpu_flags()
        units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16")) if flag in flags]
        if want == "auto":
            if has_bf16:
                chosen, reason = "bf16", f"this CPU has {' and '.join(units) or 'BF16 units'}"
            else:
                chosen, reason = "f32", "this CPU has no AMX or AVX-512-BF16"
        elif want == "bf16" and not has_bf16:
            raise OpenVINOUnavailable(
                "bf16 asked for, but this CPU has no AMX or AVX-512-BF16; use model.openvino_precision = auto or fp32"
            )
        elif want == "f16" and "FP16" not in caps:
            raise OpenVINOUnavailable("fp16 asked for, but this CPU cannot compute in fp16 in OpenVINO; use auto or fp32")
        else:
            chosen, reason = want, "asked for"
    else:
        chosen, reason = ("f16", f"the {kind}'s native precision") if want == "auto" else (want, "asked for")
    return OvTarget(
        device=device, full_name=full_name, precision=chosen, reason=reason, capabilities=",".join(caps),
        version=_version(ov), threads=threads if kind == "CPU" else None,
    )


# -- keys and conversion -------------------------------------------------------------------


def static_profile(shapes: Shapes, component: str, scale: int) -> EngineProfile:
    """The exact shape a static model was compiled for, as a cache-key profile."""
    first = shapes[0]
    batch = int(first[0])
    if component == "vae_encoder":
        height, width = int(first[2]), int(first[3])
    else:
        height, width = int(first[2]) * scale, int(first[3]) * scale
    return EngineProfile(
        min_batch=batch, opt_batch=batch, max_batch=batch, vae_max_batch=batch,
        min_size=min(height, width), max_size=max(height, width), opt_height=height, opt_width=width,
    )


def make_key(components: Any, component: str, shapes: Shapes, target: OvTarget, weights: str) -> EngineKey:
    """The cache key of one static OpenVINO model of `component` for these weights and this target."""
    return EngineKey(
        component=component,
        model=str(components.identity),
        weights=weights,
        lora=identity_part(str(components.identity), "lora="),
        vae_kind="taesd" if components.tiny_vae else "full",
        profile=static_profile(shapes, component, vae_scale(components)),
        dtype=PRECISIONS.get(target.precision, target.precision),
        runtime_version=target.version,
        device_name=f"{target.device} {target.full_name}",
        device_detail=target.capabilities,
        runtime="openvino",
    )


def _module(components: Any, component: str) -> torch.nn.Module:
    """The module converted for `component`: the seams' (onnx_export), or the UNet with ControlNet
    residual inputs (controlnet_export)."""
    if component == CONTROL_UNET:
        from streamnode.accel.controlnet_export import UNetWithResiduals

        return UNetWithResiduals(components.unet, 0).eval()
    return component_module(components, component)


def _seam_inputs(components: Any, component: str, shapes: Shapes) -> tuple[torch.Tensor, ...]:
    """Trace inputs of these shapes (values do not matter: every axis becomes a static shape later)."""
    gen = torch.Generator("cpu").manual_seed(0)
    if component in ("unet", CONTROL_UNET):
        (x, t, e, *residuals) = shapes
        return (
            torch.randn(x, generator=gen),
            torch.randint(100, 900, t, generator=gen),
            torch.randn(e, generator=gen),
            *(torch.randn(r, generator=gen) for r in residuals),
        )
    if component == "vae_encoder":
        return (torch.rand(shapes[0], generator=gen) * 2 - 1,)
    return (torch.randn(shapes[0], generator=gen),)


_CONVERTED: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_CONVERTED_LOCK = threading.Lock()
_CONVERTED_KEEP = 3
"""Converted graphs kept per process: one model's three components (an engine rebuilt on the
same weights, or a new shape, compiles without tracing again; a model switch evicts the old)."""


def converted(components: Any, component: str, shapes: Shapes, weights: str, store: IrStore) -> Any:
    """`convert()`, remembered per (model, component, weights) for the process, and kept in
    `store` for the processes after it (openvino_ir.py: a new shape then never traces)."""
    import openvino as ov

    key = (str(components.identity), component, weights)
    with _CONVERTED_LOCK:
        if key in _CONVERTED:
            _CONVERTED.move_to_end(key)
            return _CONVERTED[key]
    stored = IrStore.key(*key, openvino_version=_version(ov))
    model = store.read(stored)
    if model is None:
        model = convert(components, component, shapes)
        store.write(stored, model)
    with _CONVERTED_LOCK:
        _CONVERTED[key] = model
        while len(_CONVERTED) > _CONVERTED_KEEP:
            _CONVERTED.popitem(last=False)
    return model


def convert(components: Any, component: str, shapes: Shapes) -> Any:
    """The `component` module as an `openvino.Model`, traced at `shapes` (its axes left dynamic)."""
    import openvino as ov

    _converter_telemetry_off()
    module = _module(components, component)
    inputs = _seam_inputs(components, component, shapes)
    start = time.perf_counter()
    with torch.no_grad(), _quiet_tracer():
        # Weights are copied, not shared: the compiled models must not depend on torch memory
        # that a later `Module.to()` (torch.compile's channels-last, a model switch) may free.
        model = ov.convert_model(module, example_input=inputs, share_weights=False)
    logger.info("openvino: converted %s in %.1f s", component, time.perf_counter() - start)
    return model


@functools.cache
def _converter_telemetry_off() -> None:
    """OpenVINO's model converter reports each conversion to Google Analytics unless the user
    opted out in their home folder. A node must not reach the network on its own (a show network
    may have none), and where it could not, the report's sender kept a conversion's process from
    exiting for 36 s. The converter configures its telemetry singleton once per process and then
    reuses it: configured here first, exactly as the converter does (its own function), with the
    consent withdrawn, no conversion of this process sends anything."""
    try:
        from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry

        init_ovc_telemetry().consent = False
    except Exception as e:  # noqa: BLE001 - an OpenVINO without it (the converter's stub sends nothing)
        logger.debug("openvino: converter telemetry left as it is (%s)", e)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # TorchScript tracer warnings about Python values from shapes: every one is a channel
        # count or a branch on a shape, and the model is compiled static for exactly that shape.
        warnings.simplefilter("ignore")
        yield


def _static(model: Any, component: str, shapes: Shapes) -> Any:
    """A copy of `model` with static `shapes`, NHWC image ports and an int64 timestep port."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    m = model.clone()
    m.reshape({m.inputs[i]: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
    ppp = PrePostProcessor(m)
    for i in _NHWC_INPUTS.get(component, ()):
        ppp.input(i).tensor().set_layout(ov.Layout("NHWC"))
        ppp.input(i).model().set_layout(ov.Layout("NCHW"))
    for i in _NHWC_OUTPUTS.get(component, ()):
        ppp.output(i).tensor().set_layout(ov.Layout("NHWC"))
        ppp.output(i).model().set_layout(ov.Layout("NCHW"))
    if component in ("unet", CONTROL_UNET):
        # The engine's timesteps are int64; the cast happens inside the compiled model.
        ppp.input(1).tensor().set_element_type(ov.Type.i64)
    return ppp.build()


# -- one component -------------------------------------------------------------------------


def shapes_of(args: tuple[Any, ...]) -> Shapes:
    return tuple(tuple(int(d) for d in a.shape) for a in args)


class OvComponent:
    """One seam's compiled models, one per static input shape, with an infer request each.

    `__call__(*tensors)` takes the seam's torch tensors and returns a fresh float32 tensor (the
    VAE decoder's in channels-last memory, as the engine's own decoder output). `accepts()` says
    whether a shape is compiled; an unknown one is queued on the background compiler.
    """

    def __init__(
        self,
        components: Any,
        component: str,
        target: OvTarget,
        cache: EngineCache,
        compiler: BackgroundCompiler | None = None,
    ) -> None:
        self.components = components
        self.component = component
        self.target = target
        self.cache = cache
        self.compiler = compiler
        self._weights: str | None = None
        self._requests: dict[Shapes, Any] = {}
        self._lock = threading.Lock()
        self.entries: dict[Shapes, CacheEntry] = {}
        self.compiled: dict[Shapes, float] = {}
        """Seconds spent getting each shape ready (compile, or import from the cache)."""

    @property
    def weights(self) -> str:
        if self._weights is None:
            self._weights = weights_fingerprint(_module(self.components, self.component))
        return self._weights

    def ready(self, shapes: Shapes) -> bool:
        return shapes in self._requests

    def prepare(self, shapes: Shapes) -> bool:
        """Compile or import the model for `shapes` on this thread; True when it was built, not cached."""
        if shapes in self._requests:
            return False
        import openvino as ov

        core = ov.Core()
        start = time.perf_counter()
        key = make_key(self.components, self.component, shapes, self.target, self.weights)
        config = self.target.config()

        def build() -> bytes:
            with self._lock:  # the engine's start and the background compiler may both get here
                model = converted(self.components, self.component, shapes, self.weights, IrStore(self.cache.root))
            compiled = core.compile_model(_static(model, self.component, shapes), self.target.device, config)
            blob = compiled.export_model()
            return blob.getvalue() if isinstance(blob, io.BytesIO) else bytes(blob)

        def load(entry: CacheEntry) -> Any:
            try:
                return core.import_model(entry.engine_path.read_bytes(), self.target.device, config)
            except RuntimeError as e:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                raise EngineLoadError(f"OpenVINO refused it: {lines[-1][:200] if lines else type(e).__name__}") from None

        self.cache.root.mkdir(parents=True, exist_ok=True)
        compiled, entry, built = obtain_engine(self.cache, key, build=build, load=load)
        request = compiled.create_infer_request()
        seconds = time.perf_counter() - start
        self.entries[shapes] = entry
        self.compiled[shapes] = seconds
        self._requests[shapes] = request
        logger.info(
            "openvino: %s for %s %s in %.1f s (%s)", self.component, " ".join("x".join(map(str, s)) for s in shapes),
            "compiled" if built else "loaded from the cache", seconds, entry.directory.name,
        )
        return built

    def accepts(self, *args: torch.Tensor) -> str | None:
        shapes = shapes_of(args)
        if shapes in self._requests:
            return None
        if self.compiler is not None:
            self.compiler.submit(self, shapes)
        return f"no OpenVINO model for {' '.join('x'.join(map(str, s)) for s in shapes)} yet; compiling it in the background"

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        request = self._requests[shapes_of(args)]
        feeds = []
        nhwc = _NHWC_INPUTS.get(self.component, ())
        for i, a in enumerate(args):
            view = a.detach().permute(0, 2, 3, 1) if i in nhwc else a.detach()
            # A view of torch's memory (no copy) when the layout already matches the port.
            feeds.append(view.numpy() if view.is_contiguous() else np.ascontiguousarray(view.numpy()))
        # share_inputs: OpenVINO reads the numpy views in place; outputs are fresh arrays, so the
        # engine may keep a result (the last image) while later calls run.
        result = request.infer(feeds, share_inputs=True, share_outputs=False)
        out = torch.from_numpy(result[0])
        if 0 in _NHWC_OUTPUTS.get(self.component, ()):
            out = out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last, as the engine wants
        return out

    def close(self) -> None:
        """Drop the compiled models and stop the compiler; safe twice."""
        if self.compiler is not None:
            self.compiler.close()
        self._requests = {}


class OvUnet:
    """The `unet_call` seam over two compiled UNets: the plain one, and for the calls with
    ControlNet residuals (`control=`) the UNet with residual inputs (compiled in the background the
    first time a ControlNet acts; those calls run in PyTorch until it is ready)."""

    takes_control = True

    def __init__(self, plain: OvComponent, control: OvComponent) -> None:
        self.plain, self.control = plain, control

    def __getattr__(self, name: str) -> Any:
        return getattr(self.plain, name)  # entries, compiled, target, prepare, ready: the plain UNet's

    @staticmethod
    def _args(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, control: Any) -> tuple[torch.Tensor, ...]:
        return (x, t, emb) if control is None else (x, t, emb, *control[0], control[1])

    def accepts(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, control: Any = None,
                **_: Any) -> str | None:
        part = self.plain if control is None else self.control
        return part.accepts(*self._args(x, t, emb, control))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, control: Any = None,
                 **_: Any) -> torch.Tensor:
        part = self.plain if control is None else self.control
        return part(*self._args(x, t, emb, control))

    def close(self) -> None:
        self.plain.close()
        self.control.close()


# -- background compiles -------------------------------------------------------------------


class BackgroundCompiler:
    """One daemon thread that compiles shapes first seen during a show, so the engine thread never does.

    `submit()` never blocks; a shape is queued once. `wait()` returns when the queue is empty
    (for tests and benchmarks). A failed compile is logged once and that shape stays in PyTorch.
    """

    def __init__(self, name: str = "openvino-compile") -> None:
        self.name = name
        self._queue: queue.Queue[tuple[OvComponent, Shapes] | None] = queue.Queue()
        self._seen: set[tuple[int, Shapes]] = set()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failed: dict[tuple[str, Shapes], str] = {}

    def submit(self, component: OvComponent, shapes: Shapes) -> None:
        with self._lock:
            key = (id(component), shapes)
            if self._closed or key in self._seen:
                return
            self._seen.add(key)
            self._idle.clear()
            self._queue.put((component, shapes))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            component, shapes = item
            try:
                if not self._closed:  # shapes queued before close() are dropped, not compiled
                    component.prepare(shapes)
            except Exception as e:  # noqa: BLE001 - a failed compile keeps that shape in PyTorch
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                self.failed[(component.component, shapes)] = reason
                logger.error("openvino: compiling %s for %s failed (%s); it stays in PyTorch", component.component,
                             shapes, reason)
            finally:
                with self._lock:
                    if self._queue.empty():
                        self._idle.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True when every queued shape has been handled within `timeout` seconds."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop after the compile in progress (if any); later submits are ignored. Safe twice."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None
            self._idle.set()


# -- the backend ---------------------------------------------------------------------------


class OpenVINOBackend:
    """The three seams' OpenVINO components for one engine, sharing one target and one compiler."""

    def __init__(self, components: Any, target: OvTarget, cache: EngineCache | None = None) -> None:
        self.target = target
        self.compiler = BackgroundCompiler()
        cache = cache or EngineCache()
        self.parts: dict[str, Any] = {
            seam: OvComponent(components, component, target, cache, self.compiler)
            for seam, component in SEAM_COMPONENTS.items()
        }
        if not components.conditioning.pooled_dim:  # SD1/SD2: ControlNet frames stay in OpenVINO too
            control = OvComponent(components, CONTROL_UNET, target, cache, self.compiler)
            self.parts["unet_call"] = OvUnet(self.parts["unet_call"], control)

    def prepare(self, inputs: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, bool]:
        """Compile or import the models for these seam inputs' shapes, here and now."""
        return {seam: part.prepare(shapes_of(inputs[seam])) for seam, part in self.parts.items()}

    def queue(self, inputs: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Compile the models for these shapes in the background (the seams run PyTorch until then)."""
        for seam, part in self.parts.items():
            shapes = shapes_of(inputs[seam])
            if not part.ready(shapes):
                self.compiler.submit(part, shapes)

    def wait(self, timeout: float | None = None) -> bool:
        return self.compiler.wait(timeout)

    def close(self) -> None:
        self.compiler.close()
        for part in self.parts.values():
            part.close()


def check_size(height: int, width: int) -> str | None:
    """None when OpenVINO can take a height×width stream, else why not (the UNet halves the latent)."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        return (
            f"{width}x{height} is not a multiple of {SIZE_MULTIPLE} in both sides, which the OpenVINO "
            f"models need (e.g. {max(SIZE_MULTIPLE, width - width % SIZE_MULTIPLE)}x"
            f"{max(SIZE_MULTIPLE, height - height % SIZE_MULTIPLE)})"
        )
    return None


def describe_target(target: OvTarget) -> str:
    """One line for the log: version, device and precision with its reason."""
    return f"OpenVINO {target.version} on {target.device} {target.describe()}"


__all__ = [
    "INSTALL_HINT",
    "BackgroundCompiler",
    "OpenVINOBackend",
    "OpenVINOUnavailable",
    "OvComponent",
    "OvTarget",
    "check_size",
    "choose_target",
    "describe_target",
    "make_key",
    "openvino_status",
    "static_profile",
]
