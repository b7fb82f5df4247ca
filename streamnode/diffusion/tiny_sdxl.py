"""The embedded `tiny-sdxl` model: a randomly initialised, CPU-sized model of the SDXL architecture.

Everything that makes SDXL another family is there: two CLIP text encoders (the second with a
projection, whose pooled output conditions the UNet), a UNet with `addition_embed_type="text_time"`
(pooled embedding + six size ids), linear attention projections, a TAESD-class tiny VAE and a
full VAE with SDXL's scaling factor. Like `tiny` (tiny.py), it is built deterministically, saved
with `save_pretrained` into the user cache as an ordinary diffusers folder with a
`model_index.json` declaring `StableDiffusionXLPipeline`, and loaded by the same loader as any
SDXL folder: the tests of the SDXL family run on it. Its images are noise-like.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from streamnode.config import cache_dir
from streamnode.diffusion.tiny import save_vaes, tiny_scheduler, tiny_vaes, write_tiny_tokenizer

logger = logging.getLogger(__name__)

TINY_SDXL_FORMAT = 1
"""Bumped whenever the architecture below changes, so an old cached copy is rebuilt."""

TINY_SDXL_SEED = 20240125
TEXT_WIDTH = 32
"""Hidden width of each text encoder: the UNet cross-attends over 2 × 32 = 64."""
POOLED_DIM = 32
TIME_EMBED_DIM = 8
"""Per size id (SDXL: 256); the addition embedding takes POOLED_DIM + 6 × TIME_EMBED_DIM."""
_MARKER = "streamnode_tiny_sdxl.json"


def tiny_sdxl_dir() -> Path:
    return cache_dir() / "models" / f"tiny-sdxl-v{TINY_SDXL_FORMAT}"


def ensure_tiny_sdxl_model() -> Path:
    """Return the cached tiny SDXL folder, building it first if it is missing or incomplete."""
    path = tiny_sdxl_dir()
    if (path / _MARKER).is_file():
        return path
    logger.info("building the embedded tiny-sdxl model into %s (once)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside and renamed: a crash or a parallel build never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-", dir=path.parent))
    try:
        build_tiny_sdxl_model(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_sdxl_model(folder: Path) -> None:
    """Create the weights from a fixed seed and save them as an SDXL diffusers folder."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    write_tiny_tokenizer(folder / "tokenizer_2")
    # SDXL's second tokenizer pads with "!" rather than the end token; the pooled output is still
    # read at the end token.
    config_2 = folder / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_2.read_text(encoding="utf-8"))
    config["pad_token"] = "!"
    config_2.write_text(json.dumps(config, indent=2), encoding="utf-8")
    bos, eos = vocab_size - 2, vocab_size - 1

    def text_config(**extra: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos, **extra,
        )

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SDXL_SEED)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_WIDTH,
            attention_head_dim=4,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM,
        )
        vae_tiny, vae = tiny_vaes(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(text_config())
        text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=POOLED_DIM))
    finally:
        torch.random.set_rng_state(generator_state)

    scheduler = tiny_scheduler()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    save_vaes(folder, vae_tiny, vae)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    (folder / _MARKER).write_text(json.dumps({"format": TINY_SDXL_FORMAT, "seed": TINY_SDXL_SEED}), encoding="utf-8")
