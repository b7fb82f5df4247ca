"""The embedded `tiny` ControlNet: a random ControlNet for the tiny model (demo, tests, benchmarks).

Made from the tiny UNet with diffusers' `ControlNetModel.from_unet` (the encoder copied from the
UNet, as a real ControlNet starts), then its output convolutions, which a fresh ControlNet has
at zero (`controlnet_down_blocks`, `controlnet_mid_block`), and its map embedding are drawn at
random from a fixed seed: with zero outputs every residual is 0 and a ControlNet would change
nothing. Saved into the user cache as an ordinary diffusers folder (safetensors) and loaded like
any other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from streamnode.config import cache_dir

logger = logging.getLogger(__name__)

TINY_CONTROLNET_FORMAT = 2
TINY_CONTROLNET_SEED = 20240101
OUTPUT_STD = 0.3
"""Std of the randomised output convolutions: residuals of the order of the UNet's own features."""
MAP_GAIN = 1.5
"""Init gain of the map embedding's convolutions: a plain white map gives features of std ≈ 1."""


def tiny_controlnet_dir() -> Path:
    return cache_dir() / "models" / f"tiny-controlnet-v{TINY_CONTROLNET_FORMAT}"


def random_controlnet(unet: Any, seed: int, *, std: float = OUTPUT_STD) -> Any:
    """A ControlNetModel from `unet` whose zero-initialised output convolutions and map embedding
    output are random (seeded), so its residuals are not 0."""
    import torch
    from diffusers import ControlNetModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        embedding = net.controlnet_cond_embedding
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                conv.weight.normal_(0.0, std)
                conv.bias.normal_(0.0, std * 0.1)
            # The map embedding: a variance-keeping init through its SiLU stack, so the map's
            # content reaches the residuals (the default init all but erases it at these widths).
            for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
                conv.weight.normal_(0.0, MAP_GAIN / math.sqrt(conv.weight[0].numel()))
                conv.bias.zero_()
    finally:
        torch.random.set_rng_state(state)
    return net.eval().requires_grad_(False)


def ensure_tiny_controlnet() -> Path:
    """The cached tiny ControlNet folder, built first if missing (atomically, like the tiny model)."""
    path = tiny_controlnet_dir()
    if (path / "streamnode_tiny_controlnet.json").is_file():
        return path
    from diffusers import UNet2DConditionModel

    from streamnode.diffusion.tiny import ensure_tiny_model

    logger.info("building the embedded tiny ControlNet into %s (once)", path)
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model() / "unet", use_safetensors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-controlnet-", dir=path.parent))
    try:
        random_controlnet(unet, TINY_CONTROLNET_SEED).save_pretrained(tmp, safe_serialization=True)
        (tmp / "streamnode_tiny_controlnet.json").write_text(
            json.dumps({"format": TINY_CONTROLNET_FORMAT, "seed": TINY_CONTROLNET_SEED}), encoding="utf-8"
        )
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "streamnode_tiny_controlnet.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
