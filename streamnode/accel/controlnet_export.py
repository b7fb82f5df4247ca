"""ONNX graphs for ControlNets: the UNet with residual inputs, and each ControlNet.

The UNet graph with residuals takes, after the seam's inputs and the family's extras
(`onnx_export.unet_io_names`), one input per down-block residual (`down_residual_0` …) and the
mid-block residual (`mid_residual`), and adds them where diffusers adds
`down_block_additional_residuals` / `mid_block_additional_residual`. The residuals of several
nets are summed before the call (diffusion/controlnet.py), so **one graph serves 0..N nets**:
with no net the inputs are zeros, which adds exactly nothing. `ResidualUnetCall` is that graph
(or any positional runner of it: onnxruntime, a TensorRT engine) behind the engine's
`unet_call` seam, zeros included; it says `takes_control`, so `GuardedCall` hands it the calls
with ControlNets too.

A ControlNet graph (`ControlNetStep`) takes (sample, timestep, encoder_hidden_states,
controlnet_cond[, text_embeds, time_ids]) and returns the down residuals and the mid residual at
conditioning scale 1 (the engine weights them per row afterwards). Batch and the spatial axes are
dynamic in both; each residual's own spatial axes are named after it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from streamnode.accel.onnx_export import (
    OPSET,
    UNET_EXTRA_INPUTS,
    ExportReport,
    cleanup_onnx,
    sample_inputs,
    unet_io_names,
    vae_scale,
)


def residual_shapes(unet_config: Any, latent_h: int, latent_w: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of every down residual, then the mid residual, for latents of latent_h×latent_w:
    conv_in's output, each resnet layer of each down block, each downsampler (not after the last)."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    per_block = layers if isinstance(layers, int) else None
    h, w = latent_h, latent_w
    shapes = [(channels[0], h, w)]
    for i, c in enumerate(channels):
        for _ in range(per_block if per_block is not None else layers[i]):
            shapes.append((c, h, w))
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c, h, w))
    shapes.append((channels[-1], h, w))
    return shapes


def residual_names(unet_config: Any) -> tuple[str, ...]:
    count = len(residual_shapes(unet_config, 8, 8)) - 1
    return (*(f"down_residual_{i}" for i in range(count)), "mid_residual")


class UNetWithResiduals(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids], down_residual_0 …, mid_residual) → ε."""

    def __init__(self, unet: torch.nn.Module, extras: int) -> None:
        super().__init__()
        self.unet = unet
        self.extras = extras

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        extra, residuals = rest[: self.extras], rest[self.extras :]
        added = dict(zip(UNET_EXTRA_INPUTS, extra, strict=True)) if extra else None
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
            down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNetStep(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond[, text_embeds, time_ids]) →
    (down residuals …, mid residual) at conditioning scale 1."""

    def __init__(self, net: torch.nn.Module, extras: int) -> None:
        super().__init__()
        self.net = net
        self.extras = extras

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        added = dict(zip(UNET_EXTRA_INPUTS, extra, strict=True)) if extra else None
        down, mid = self.net(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False,
        )
        return (*down, mid)


def _axes(names: tuple[str, ...], spatial: bool = True) -> dict[str, dict[int, str]]:
    return {n: ({0: "batch", 2: f"{n}_height", 3: f"{n}_width"} if spatial else {0: "batch"}) for n in names}


def unet_residual_inputs(components: Any, *, batch: int, height: int, width: int, seed: int = 0,
                         zeros: bool = False) -> tuple[torch.Tensor, ...]:
    """The UNet's inputs with residuals: the seam's, the extras, then random (or zero) residuals."""
    s = vae_scale(components)
    base = sample_inputs(components, "unet", batch=batch, height=height, width=width, seed=seed)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    residuals = tuple(
        (torch.zeros if zeros else lambda *shape: torch.randn(*shape, generator=gen) * 0.5)(batch, *shape)
        .to(components.device, components.dtype)
        for shape in residual_shapes(components.unet.config, height // s, width // s)
    )
    return (*base, *residuals)


def controlnet_inputs(components: Any, *, batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A ControlNet's inputs: the seam's, a map (batch, 3, height, width) in [0, 1], then the extras."""
    base = sample_inputs(components, "unet", batch=batch, height=height, width=width, seed=seed)
    gen = torch.Generator("cpu").manual_seed(seed + 2)
    cond = torch.rand(batch, 3, height, width, generator=gen).to(components.device, components.dtype)
    return (*base[:3], cond, *base[3:])


def _export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, component: str,
            input_names: tuple[str, ...], output_names: tuple[str, ...], axes: dict[str, dict[int, str]],
            cleanup: bool) -> ExportReport:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on channel counts: see onnx_export.export_onnx
        torch.onnx.export(
            module.eval(), inputs, str(path), dynamo=False, opset_version=OPSET, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True,
        )
    exported = len(onnx.load(str(path), load_external_data=False).graph.node)
    method, final = cleanup_onnx(path) if cleanup else ("none", exported)
    onnx.checker.check_model(str(path))
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.stem))
    return ExportReport(component, path, OPSET, exported, final, method, time.perf_counter() - start, size)


def export_unet_with_residuals(components: Any, path: str | Path, *, batch: int = 2, height: int = 512,
                               width: int = 512, cleanup: bool = True) -> ExportReport:
    """The UNet graph with residual inputs (zeros: no ControlNet), dynamic batch and spatial axes."""
    inputs = unet_residual_inputs(components, batch=batch, height=height, width=width)
    seam = unet_io_names(components)
    names = (*seam, *residual_names(components.unet.config))
    spatial = {"sample", *residual_names(components.unet.config)}
    axes = {n: ({0: "batch", 2: "height", 3: "width"} if n == "sample" else {0: "batch"}) for n in seam}
    axes.update({k: v for k, v in _axes(names).items() if k in spatial and k != "sample"})
    axes["out_sample"] = {0: "batch", 2: "height", 3: "width"}
    module = UNetWithResiduals(components.unet, len(seam) - 3)
    return _export(module, inputs, Path(path), "unet_control", names, ("out_sample",), axes, cleanup)


def export_controlnet(net: torch.nn.Module, components: Any, path: str | Path, *, batch: int = 2, height: int = 512,
                      width: int = 512, cleanup: bool = True) -> ExportReport:
    """A ControlNet's graph: residuals at scale 1, dynamic batch and spatial axes."""
    inputs = controlnet_inputs(components, batch=batch, height=height, width=width)
    seam = unet_io_names(components)
    names = (*seam[:3], "controlnet_cond", *seam[3:])
    outputs = residual_names(components.unet.config)
    axes = {n: {0: "batch"} for n in names}
    axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    axes["controlnet_cond"] = {0: "batch", 2: "image_height", 3: "image_width"}
    axes.update(_axes(outputs))
    module = ControlNetStep(net, len(seam) - 3)
    return _export(module, inputs, Path(path), "controlnet", names, outputs, axes, cleanup)


class ResidualUnetCall:
    """The `unet_call` seam over a positional runner of the UNet graph with residuals (onnxruntime,
    a TensorRT engine): the extras and the residuals follow in graph order, zeros without a
    ControlNet (kept per shape, allocated once)."""

    takes_control = True

    def __init__(self, fn: Any, unet_config: Any) -> None:
        self.fn = fn
        self._config = unet_config
        self._zeros: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, added_cond: Any = None,
                 control: Any = None) -> torch.Tensor:
        extras = () if added_cond is None else tuple(added_cond[k] for k in UNET_EXTRA_INPUTS)
        if control is None:
            residuals = self._zeros_for(x)
        else:
            down, mid = control
            residuals = (*down, mid)
        return self.fn(x, t, emb, *extras, *residuals)

    def _zeros_for(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (tuple(x.shape), x.device, x.dtype)
        if key not in self._zeros:
            shapes = residual_shapes(self._config, x.shape[2], x.shape[3])
            self._zeros[key] = tuple(torch.zeros((x.shape[0], *s), device=x.device, dtype=x.dtype) for s in shapes)
        return self._zeros[key]

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()


class OnnxRuntimeRunner:
    """An exported graph run by onnxruntime on the CPU, positional inputs in graph order; the first
    output (all outputs with `outputs="all"`) as torch tensors. For checks, not for speed."""

    def __init__(self, path: str | Path, *, outputs: str = "first") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.all = outputs == "all"

    def __call__(self, *inputs: torch.Tensor) -> Any:
        feeds = {n: t.detach().float().cpu().numpy() for n, t in zip(self.names, inputs, strict=True)}
        if "timestep" in feeds:
            feeds["timestep"] = feeds["timestep"].astype("float32")
        out = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return out if self.all else out[0]
