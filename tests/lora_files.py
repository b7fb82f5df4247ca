"""LoRA files made in tests: random, non-zero factors trained on nothing, in the layouts found in
the wild (diffusers/PEFT with its config in the header, kohya with per-layer alphas)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def private(components: Any) -> Any:
    """Components with their own UNet copy: a LoRA stack changes the UNet it is built on."""
    return dataclasses.replace(components, unet=copy.deepcopy(components.unet))


def make_lora(unet: Any, folder: Path, *, seed: int, targets: list[str], rank: int = 4, alpha: float = 8.0,
              text_encoder: Any = None) -> Path:
    """A diffusers-layout LoRA for `unet` (as its training scripts save it: PEFT keys, the PEFT config
    in the safetensors header); with `text_encoder`, a text-encoder part too. Returns the file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        copy_ = copy.deepcopy(unet)
        copy_.add_adapter(config)
        layers = get_peft_model_state_dict(copy_)
        te_layers = None
        if text_encoder is not None:
            te = inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                copy.deepcopy(text_encoder),
            )
            te_layers = get_peft_model_state_dict(te)
    finally:
        torch.random.set_rng_state(state)
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, text_encoder_lora_layers=te_layers, safe_serialization=True,
        unet_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=meta if te_layers else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(diffusers_file: Path, out: Path, *, alpha: float) -> Path:
    """The same LoRA in kohya's layout (lora_unet_… names, lora_down/lora_up, a per-layer alpha)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(load_file(str(diffusers_file)))
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)
    save_file(kohya, str(out))
    return out
