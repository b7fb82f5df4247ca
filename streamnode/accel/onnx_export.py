"""ONNX export of the UNet, the VAE encoder and the VAE decoder (TAESD or full), with dynamic axes.

The graphs compute exactly what the stream engine's three seams compute
(`unet_call`, `vae_encode`, `vae_decode`): the VAE graphs include the latent scaling, so an
engine is a drop-in replacement. Batch, height and width are dynamic; the text length (77) and
the channel counts are fixed. An SDXL UNet's graph has two more inputs after
`encoder_hidden_states`, the seam's keyword-only `added_cond` in `UNET_EXTRA_INPUTS` order:
`text_embeds` (batch, pooled width) and `time_ids` (batch, 6) (`unet_io_names`). Export uses the TorchScript-based exporter (`dynamo=False`) at
opset 17: it handles diffusers UNets with dynamic spatial axes reliably, and TensorRT 10 and
11 parse its output. The graph is then cleaned up and constant-folded (onnx-graphsurgeon when
installed, as with the `tensorrt` extra; otherwise onnxruntime's basic, provider-independent
optimisations) and checked with `onnx.checker`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

OPSET = 17
UNET_EXTRA_INPUTS: tuple[str, ...] = ("text_embeds", "time_ids")
"""The UNet seam's `added_cond` (diffusers' `added_cond_kwargs`, SDXL) as graph inputs, in this order."""
_TWO_GIB = 2 << 30

IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_encoder": (("images",), ("latents",)),
    "vae_decoder": (("latents",), ("images",)),
}
_SPATIAL = {0: "batch", 2: "height", 3: "width"}
DYNAMIC_AXES: dict[str, dict[str, dict[int, str]]] = {
    "unet": {
        "sample": _SPATIAL,
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch"},
        "text_embeds": {0: "batch"},
        "time_ids": {0: "batch"},
        "out_sample": _SPATIAL,
    },
    "vae_encoder": {"images": _SPATIAL, "latents": _SPATIAL},
    "vae_decoder": {"latents": _SPATIAL, "images": _SPATIAL},
}


def unet_io_names(components: Any) -> tuple[str, ...]:
    """The UNet graph's inputs: the seam's three, then the family's extra conditioning (SDXL)."""
    extra = UNET_EXTRA_INPUTS if components.conditioning.pooled_dim else ()
    return (*IO_NAMES["unet"][0], *extra)


def io_names(components: Any, component: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of `component`'s graph for these components."""
    if component == "unet":
        return unet_io_names(components), IO_NAMES["unet"][1]
    return IO_NAMES[component]


class UNetStep(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) → ε, the `unet_call` seam
    as a module with positional inputs (what ONNX, TensorRT and torch.compile take).

    The timestep is a float32 vector in the graph (an int64 input would be cast straight away
    anyway, and float inputs are what every TensorRT version handles best).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class PositionalUnetCall:
    """The `unet_call` seam over a backend that takes every input positionally (a compiled
    `UNetStep`, a TensorRT engine): `added_cond`'s tensors follow in `UNET_EXTRA_INPUTS` order."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, added_cond: Any = None
    ) -> torch.Tensor:
        if added_cond is None:
            return self.fn(x, t, emb)
        return self.fn(x, t, emb, *(added_cond[k] for k in UNET_EXTRA_INPUTS))

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()


class VaeEncode(torch.nn.Module):
    """Image in [-1, 1] → UNet-scale latents, through the loader's own `encode_image`."""

    def __init__(self, components: Any) -> None:
        super().__init__()
        self.vae = components.vae  # registered, so its weights become graph initializers
        self._encode = components.encode_image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)


class VaeDecode(torch.nn.Module):
    """UNet-scale latents → image in about [-1, 1], through the loader's own `decode_latents`."""

    def __init__(self, components: Any) -> None:
        super().__init__()
        self.vae = components.vae
        self._decode = components.decode_latents

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)


def component_module(components: Any, component: str) -> torch.nn.Module:
    """The module whose graph is exported (and compiled) for `component`, in eval mode."""
    if component == "unet":
        module: torch.nn.Module = UNetStep(components.unet)
    elif component == "vae_encoder":
        module = VaeEncode(components)
    elif component == "vae_decoder":
        module = VaeDecode(components)
    else:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(IO_NAMES)}")
    return module.eval()


def vae_scale(components: Any) -> int:
    return int(getattr(components, "vae_scale_factor", 8))


def sample_inputs(
    components: Any,
    component: str,
    *,
    batch: int,
    height: int,
    width: int,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random inputs for `component` at an image size of height×width pixels."""
    dev = device if device is not None else components.device
    dtype = components.dtype
    gen = torch.Generator("cpu").manual_seed(seed)
    s = vae_scale(components)
    if component == "unet":
        sample = torch.randn(batch, 4, height // s, width // s, generator=gen)
        timestep = torch.randint(0, 1000, (batch,), generator=gen).float()
        text = torch.randn(batch, components.model_max_length, components.cross_attention_dim, generator=gen)
        inputs = (sample.to(dev, dtype), timestep.to(dev), text.to(dev, dtype))
        pooled = components.conditioning.pooled_dim
        if not pooled:
            return inputs
        text_embeds = torch.randn(batch, pooled, generator=gen)
        # Sizes as the engine sends them: (h, w, 0, 0, h, w) in pixels.
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(batch, 6)
        return (*inputs, text_embeds.to(dev, dtype), time_ids.to(dev, dtype))
    if component == "vae_encoder":
        return ((torch.rand(batch, 3, height, width, generator=gen) * 2 - 1).to(dev, dtype),)
    if component == "vae_decoder":
        return (torch.randn(batch, 4, height // s, width // s, generator=gen).to(dev, dtype),)
    raise ValueError(f"unknown component {component!r}")


@dataclass
class ExportReport:
    component: str
    path: Path
    opset: int
    nodes_exported: int
    nodes_final: int
    cleanup: str
    seconds: float
    size_bytes: int


def export_onnx(
    components: Any,
    component: str,
    path: str | Path,
    *,
    batch: int = 2,
    height: int = 512,
    width: int = 512,
    cleanup: bool = True,
) -> ExportReport:
    """Export `component` to `path` (ONNX, opset 17, dynamic batch and spatial axes).

    The sample shapes only seed the trace; every dynamic axis stays symbolic. Use sizes that are
    multiples of 64 so the UNet traces its plain ×2 upsampling (any multiple of 64 then works).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = component_module(components, component)
    inputs = sample_inputs(components, component, batch=batch, height=height, width=width)
    input_names, output_names = io_names(components, component)
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python ints from shapes are expected: every such value is a
        # channel count or the fixed text length, and the dynamic axes are checked by the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={n: a for n, a in DYNAMIC_AXES[component].items() if n in (*input_names, *output_names)},
            do_constant_folding=True,
        )
    exported = len(onnx.load(str(path), load_external_data=False).graph.node)
    method, final = ("none", exported)
    if cleanup:
        method, final = cleanup_onnx(path)
    onnx.checker.check_model(str(path))
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.stem))
    report = ExportReport(component, path, OPSET, exported, final, method, time.perf_counter() - start, size)
    logger.info(
        "exported %s to ONNX in %.1f s: %d nodes, %d after %s cleanup, %.1f MiB",
        component, report.seconds, exported, final, method, size / 2**20,
    )
    return report


def _save(model: Any, path: Path) -> None:
    import onnx

    if model.ByteSize() >= _TWO_GIB - (64 << 20):
        # Protobuf cannot hold more than 2 GiB: the weights go to one side file.
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.stem}.weights")
    else:
        onnx.save(model, str(path))


def cleanup_onnx(path: Path) -> tuple[str, int]:
    """Remove dead nodes and fold constants in place; returns (method, nodes after)."""
    import onnx

    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        gs = None
    if gs is not None:
        graph = gs.import_onnx(onnx.load(str(path)))
        graph.cleanup().toposort()
        graph.fold_constants().cleanup()
        model = gs.export_onnx(graph)
        _save(model, path)
        return "onnx-graphsurgeon", len(model.graph.node)
    return "onnxruntime", _cleanup_with_onnxruntime(path)


def _cleanup_with_onnxruntime(path: Path) -> int:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Basic level only: constant folding and redundant-node removal, all in standard ONNX ops.
    # Higher levels fuse into onnxruntime-only ops that TensorRT cannot parse.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_name(f"{path.stem}.ortopt.onnx")
    options.optimized_model_filepath = str(tmp)
    big = sum(p.stat().st_size for p in path.parent.glob(f"{path.stem}*")) >= _TWO_GIB - (64 << 20)
    if big:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{path.stem}.weights"
        )
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp))
    # onnxruntime lists its private domains even when no node uses them; a strict parser
    # (TensorRT's) should only ever see the standard opset.
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    _save(model, path)
    tmp.unlink(missing_ok=True)
    return len(model.graph.node)


def onnxruntime_outputs(path: str | Path, inputs: tuple[torch.Tensor, ...], component: str) -> torch.Tensor:
    """Run the exported graph with onnxruntime on the CPU; returns the single output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # the graph's own order: the seam's, extras last
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def max_abs_error(components: Any, component: str, path: str | Path, inputs: tuple[torch.Tensor, ...]) -> float:
    """max |onnxruntime − PyTorch| for `component` on `inputs`."""
    with torch.no_grad():
        ref = component_module(components, component)(*inputs).float().cpu()
    got = onnxruntime_outputs(path, inputs, component).float()
    if got.shape != ref.shape:
        raise AssertionError(f"onnxruntime output shape {tuple(got.shape)} ≠ PyTorch {tuple(ref.shape)}")
    return float((got - ref).abs().max())
