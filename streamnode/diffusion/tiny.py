"""The embedded `tiny` model: a randomly initialised, CPU-sized Stable Diffusion.

It has the classes of a real one (UNet2DConditionModel, a TAESD-class AutoencoderTiny, a full
AutoencoderKL, a CLIP text encoder and a CLIP BPE tokenizer, an LCM scheduler), is built
deterministically, saved with `save_pretrained` into the user cache as an ordinary diffusers
folder, and then loaded by the very same loader as any hub id or folder. Its images are
noise-like: it exists so the demo, the tests and the benchmarks run on any machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from streamnode.config import cache_dir

logger = logging.getLogger(__name__)

TINY_FORMAT = 2
"""Bumped whenever the architecture below changes, so an old cached copy is rebuilt."""

TINY_SEED = 20231220
CROSS_ATTENTION_DIM = 64
MODEL_MAX_LENGTH = 77
# A few frequent English pairs so the BPE really merges; the rest of a word falls back to bytes.
_MERGES = ["t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "n d", "th e</w>", "a t</w>"]


def tiny_model_dir() -> Path:
    return cache_dir() / "models" / f"tiny-v{TINY_FORMAT}"


def ensure_tiny_model() -> Path:
    """Return the cached tiny model folder, building it first if it is missing or incomplete."""
    path = tiny_model_dir()
    if (path / "streamnode_tiny.json").is_file():
        return path
    logger.info("building the embedded tiny model into %s (once)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build into a sibling temp folder and rename: a crash or a parallel build never leaves a
    # half-written model that a later run would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        build_tiny_model(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "streamnode_tiny.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the rest above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a CLIP-style BPE tokenizer (vocab.json, merges.txt); return its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    for merge in _MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return len(vocab)


def build_tiny_model(folder: Path) -> None:
    """Create the tiny model's weights from a fixed seed and save them as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    bos, eos = vocab_size - 2, vocab_size - 1

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        # Attention only at the 1/16 level: at 256² that is 256 tokens, cheap on a CPU.
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CROSS_ATTENTION_DIM,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        # TAESD layout (4 levels, 8× down) with slim widths: the standard 64-wide TAESD costs
        # ~0.7 s per 256² frame on 2 CPU cores.
        vae_tiny = AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16, 16),
            decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=256,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=CROSS_ATTENTION_DIM,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MODEL_MAX_LENGTH,
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)

    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    vae_tiny.save_pretrained(folder / "vae_tiny", safe_serialization=True)
    # AutoencoderTiny records a `block_out_channels` alias it then rejects (with a warning) on
    # every load; published TAESD configs do not carry it.
    vae_config = folder / "vae_tiny" / "config.json"
    config = json.loads(vae_config.read_text(encoding="utf-8"))
    config.pop("block_out_channels", None)
    vae_config.write_text(json.dumps(config, indent=2), encoding="utf-8")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    # Written last: its presence marks a complete build.
    (folder / "streamnode_tiny.json").write_text(
        json.dumps({"format": TINY_FORMAT, "seed": TINY_SEED}), encoding="utf-8"
    )
