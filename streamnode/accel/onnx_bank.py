"""The UNet with the feature bank as explicit tensors, exported to ONNX, run by onnxruntime or OpenVINO.

A stateless engine cannot keep earlier frames' features, so the bank travels through the graph
(diffusion/feature_bank.py, `BankedUNetStep`):

    inputs   sample, timestep, encoder_hidden_states, bank_fusion (), bank_threshold (),
             then per banked layer i: bank_bias{i} (rows, (1 + M)·N_i), the attention's additive bias,
                                      bank_k{i}, bank_v{i}, bank_o{i}                    (rows, M·N_i, C_i)
    outputs  out_sample, then per layer: new_k{i}, new_v{i}, new_o{i}                    (rows, N_i, C_i)

The engine keeps the ring and writes the new features into it after the frame; the graph holds
no state. Shapes are fixed (the rows, the bank size and the size are those of the stream), as a
TensorRT profile would fix them. `BankedGraphUnet` is a `unet_call` seam with `banked = True`
over that graph (onnxruntime, or OpenVINO which reads the same file): the engine hands it the
bank (`bank=BankIO`) on every call.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamnode.accel.onnx_export import OPSET
from streamnode.diffusion.feature_bank import BankedUNetStep, BankIO, FeatureBank, bank_io_names

logger = logging.getLogger(__name__)


def export_banked_unet(
    components: Any, path: str | Path, *, rows: int, bank_size: int, height: int, width: int
) -> Path:
    """Export the UNet with the bank as inputs and outputs (fixed shapes) to `path`."""
    if components.conditioning.pooled_dim:
        raise ValueError("the banked UNet export covers SD1/SD2 UNets (no added conditioning)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = int(components.vae_scale_factor)
    latent_hw = (height // s, width // s)
    bank = FeatureBank(components.unet, latent_hw)
    bank.configure(size=bank_size, fusion=0.8, threshold=0.98)
    bank.install()
    try:
        bank.reset(rows=rows)
        module = BankedUNetStep(components.unet, bank).eval()
        gen = torch.Generator("cpu").manual_seed(0)
        dtype, device = components.dtype, components.device
        features = [
            tensor
            for kvo, n in zip(bank.storage(), (layer.tokens(latent_hw) for layer in bank.layers), strict=True)
            for tensor in (torch.zeros((rows, (1 + bank_size) * n), device=device, dtype=dtype),
                           *(torch.randn(t.shape, generator=gen).to(device, dtype) for t in kvo))
        ]
        inputs = (
            torch.randn(rows, 4, *latent_hw, generator=gen).to(device, dtype),
            torch.full((rows,), 500.0).to(device),
            torch.randn(rows, components.model_max_length, components.cross_attention_dim, generator=gen).to(device, dtype),
            torch.tensor(0.8, device=device, dtype=dtype),
            torch.tensor(0.98, device=device, dtype=dtype),
            *features,
        )
        bank_inputs, bank_outputs = bank_io_names(bank.layers)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on Python ints from fixed shapes
            torch.onnx.export(
                module, inputs, str(path), dynamo=False, opset_version=OPSET,
                input_names=["sample", "timestep", "encoder_hidden_states", *bank_inputs],
                output_names=["out_sample", *bank_outputs], do_constant_folding=True,
            )
    finally:
        bank.remove()
    logger.info("exported the banked UNet (%d rows, bank of %d) to %s", rows, bank_size, path)
    return path


class BankedGraphUnet:
    """The `unet_call` seam over an exported banked UNet: stateless, the bank comes in and goes
    out as tensors on every call. runtime: "onnxruntime" (CPU) or "openvino" (its CPU device)."""

    banked = True

    def __init__(self, path: str | Path, *, runtime: str = "onnxruntime") -> None:
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            self._run = lambda feeds: session.run(None, dict(zip(names, feeds, strict=True)))
        elif runtime == "openvino":
            import openvino as ov

            # f32 as exported: the CPU plugin would otherwise pick bf16 where the CPU has it.
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
            self._run = lambda feeds: list(request.infer(feeds, share_outputs=False).values())
        else:
            raise ValueError(f"runtime {runtime!r}: use onnxruntime or openvino")
        self.runtime = runtime

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, added_cond: Any = None, bank: BankIO
    ) -> torch.Tensor:
        if added_cond is not None:
            raise ValueError("the banked UNet graph takes no added conditioning")
        if any(layer is None for layer in bank.layers) or any(bias is None for bias in bank.bias):
            raise ValueError("a stateless banked UNet needs every bank tensor (FeatureBank.call(full=True))")
        values: list[torch.Tensor] = [x, t.float(), emb, torch.tensor(float(bank.fusion)),
                                      torch.tensor(float(bank.threshold))]
        for bias, kvo in zip(bank.bias, bank.layers, strict=True):
            values += [bias, *kvo]  # type: ignore[misc]
        # np.require keeps 0-d arrays 0-d (fusion, threshold); ascontiguousarray would make them (1,).
        feeds = [np.require(v.detach().cpu().numpy(), requirements="C") for v in values]
        out = self._run(feeds)
        device = x.device
        new = [torch.from_numpy(np.asarray(a)).to(device) for a in out[1:]]
        bank.recorded[:] = [tuple(new[3 * i : 3 * i + 3]) for i in range(len(new) // 3)]  # type: ignore[misc]
        return torch.from_numpy(np.asarray(out[0])).to(device)
