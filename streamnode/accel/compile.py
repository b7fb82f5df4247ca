"""torch.compile of the three seams, with CUDA graph capture of each static shape on CUDA.

- Inductor, `dynamic=False`: every shape the stream uses is static between parameter changes,
  and static kernels are the fastest. A new shape (a resolution or batch change) recompiles once.
- channels-last weights and inputs: convolutions are faster in NHWC on GPUs and in oneDNN on CPUs.
- On CUDA each (shape, dtype) signature is captured into a `torch.cuda.CUDAGraph` after two
  warm-up runs; later calls copy into static inputs and replay, which removes the per-kernel
  launch cost that dominates a 1-step 512² UNet. Outputs are cloned so a later replay can never
  overwrite a tensor the engine still holds.
- Compilation happens at the first call per shape; `accelerate()` makes that first call at start
  (warm-up), so the cost is paid before the show and reported, not on the first live frame.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

MAX_GRAPHS = 8
"""Captured shapes kept per seam; each holds its activation memory, so old ones are dropped."""


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


class CompiledCall:
    """A compiled module called with positional tensors; reports the compile cost of each new shape."""

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        *,
        backend: str = "inductor",
        mode: str | None = None,
        channels_last: bool = True,
    ) -> None:
        self.name = name
        self.channels_last = channels_last
        # What to give back on close(): the eager path keeps a CPU TAESD channels-last already.
        convs = [p for p in module.parameters() if p.dim() == 4]
        self._was_channels_last = bool(convs) and all(
            p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
        )
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.compiled = torch.compile(module, backend=backend, mode=mode, dynamic=False, fullgraph=False)
        self.compile_seconds: dict[tuple[Any, ...], float] = {}

    def close(self) -> None:
        """Give the module back in its usual layout: `Module.to` converted the shared weights in
        place, and the eager path (or another engine on the same components) expects them as loaded."""
        if self.channels_last:
            if not self._was_channels_last:
                self.module.to(memory_format=torch.contiguous_format)
            self.channels_last = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        # Everything in inference mode, as the engine calls us: dynamo guards on it, and a tensor
        # made outside it would make every later call recompile.
        with torch.inference_mode():
            if self.channels_last:
                args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)
            sig = _signature(args)
            if sig in self.compile_seconds:
                return self.compiled(*args)
            start = time.perf_counter()
            out = self.compiled(*args)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.compile_seconds[sig] = seconds = time.perf_counter() - start
        shapes = ", ".join("x".join(map(str, s[0])) for s in sig if isinstance(s, tuple))
        logger.info("torch.compile: %s compiled for %s in %.1f s (first call)", self.name, shapes, seconds)
        return out


class CudaGraphCall:
    """Replays a CUDA graph per static input signature of `fn` (CUDA tensors only)."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], *, warmup: int = 2) -> None:
        self.name = name
        self.fn = fn
        self.warmup = warmup
        self.disabled: str | None = None
        self._graphs: OrderedDict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]]
        self._graphs = OrderedDict()

    def close(self) -> None:
        self._graphs.clear()
        if hasattr(self.fn, "close"):
            self.fn.close()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.disabled is not None:
            return self.fn(*args)
        sig = _signature(args)
        entry = self._graphs.get(sig)
        if entry is None:
            return self._capture(sig, args)
        graph, static_in, static_out = entry
        self._graphs.move_to_end(sig)
        for dst, src in zip(static_in, args, strict=True):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()

    def _capture(self, sig: tuple[Any, ...], args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        device = args[0].device
        static_in = tuple(a.detach().clone() for a in args)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):
                    out = self.fn(*static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    static_out = self.fn(*static_in)
        except Exception as e:  # noqa: BLE001 - capture is an optimisation; the plain call still works
            current.wait_stream(side)
            self.disabled = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            logger.warning("%s: CUDA graph capture failed (%s); running without graphs", self.name, self.disabled)
            return self.fn(*args)
        current.wait_stream(side)
        self._graphs[sig] = (graph, static_in, static_out)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        logger.info("%s: captured a CUDA graph for %s", self.name, [s[0] for s in sig])
        # The warm-up ran on these very inputs, so its output is this call's result.
        return out.clone()


def compile_seams(
    components: Any,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    cuda_graphs: bool = True,
) -> dict[str, Callable[..., torch.Tensor]]:
    """Compiled replacements for `unet_call`, `vae_encode` and `vae_decode`.

    The UNet takes the engine's (x, t, emb, *, added_cond) and runs on exactly the module the ONNX
    export uses (the extra conditioning positional, `PositionalUnetCall`).
    """
    from streamnode.accel.onnx_export import PositionalUnetCall, component_module

    on_cuda = components.device.type == "cuda"
    # Guard compiled graphs on the modules' forward hooks: runtime LoRAs are hooks (lora.py), and
    # without this guard a UNet with LoRA hooks would reuse a graph traced on a UNet without them
    # (another engine in this process: dynamo caches per code object, not per module).
    import torch._dynamo.config as dynamo_config

    dynamo_config.skip_nnmodule_hook_guards = False
    if on_cuda and backend == "inductor":
        import torch._inductor.config as inductor_config

        # 1×1 convolutions as matmuls: a measured win for SD UNets on NVIDIA GPUs.
        inductor_config.conv_1x1_as_mm = True
    seams: dict[str, Callable[..., torch.Tensor]] = {}
    for seam, component in (("unet_call", "unet"), ("vae_encode", "vae_encoder"), ("vae_decode", "vae_decoder")):
        call: Callable[..., torch.Tensor] = CompiledCall(
            component, component_module(components, component), backend=backend, mode=mode
        )
        if on_cuda and cuda_graphs:
            call = CudaGraphCall(component, call)
        seams[seam] = PositionalUnetCall(call) if seam == "unet_call" else call
    return seams


def compile_report(seams: dict[str, Any]) -> dict[str, float]:
    """Seconds spent compiling, per seam (summed over shapes)."""
    from streamnode.accel.onnx_export import PositionalUnetCall

    out = {}
    for seam, call in seams.items():
        call = call.fn if isinstance(call, PositionalUnetCall) else call
        inner = call.fn if isinstance(call, CudaGraphCall) else call
        if isinstance(inner, CompiledCall):
            out[seam] = round(sum(inner.compile_seconds.values()), 2)
    return out
