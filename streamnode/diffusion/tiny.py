"""The embedded `tiny` model: a small trained stand-in for Stable Diffusion, CPU-sized.

It has the classes of a real one (UNet2DConditionModel, a TAESD-class AutoencoderTiny, a full
AutoencoderKL, a CLIP text encoder and a CLIP BPE tokenizer, an LCM scheduler). Its weights are
the small safetensors files in `tiny_model/` next to this file, made by `scripts/train_tiny.py`
(synthetic images and captions, a fixed seed; docs/tiny-model.md): it reconstructs its input
frame and restyles it by a few words (`TINY_LOOKS`). `ensure_tiny_model()` writes it once into
the user cache as an ordinary diffusers folder, which the very same loader as any hub id or
folder then reads. It is a stand-in so the demo, the tests and the benchmarks run and can be
judged by eye on any machine, not an image generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from streamnode.config import cache_dir

logger = logging.getLogger(__name__)

TINY_FORMAT = 3
"""Bumped whenever the architecture or the folder's layout changes, so an old cached copy is
rebuilt; new weights rename the cache folder by themselves (`weights_id`)."""

WEIGHTS_DIR = Path(__file__).with_name("tiny_model")
"""The trained weights (one safetensors file per component), committed with the package."""

TINY_SEED = 20231220
CROSS_ATTENTION_DIM = 64
MODEL_MAX_LENGTH = 77
# A few frequent English pairs so the BPE really merges; the rest of a word falls back to bytes.
_MERGES = ["t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "n d", "th e</w>", "a t</w>"]

TINY_LOOKS: dict[str, tuple[str, ...]] = {
    # colour looks: the frame's luminance mapped onto a palette
    "fire": ("fire", "flames", "flame", "lava", "burning"),
    "ocean": ("ocean", "sea", "water", "waves", "stormy"),
    "forest": ("forest", "jungle", "leaves", "moss"),
    "snow": ("snow", "ice", "winter", "frost"),
    "neon": ("neon", "cyber", "synthwave"),
    "sunset": ("sunset", "dusk", "autumn"),
    "gold": ("gold", "golden", "sun", "desert"),
    "night": ("night", "midnight", "moon", "dark"),
    "mono": ("mono", "gray", "grey", "charcoal", "noir"),
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    # texture looks: applied before the colour look
    "soft": ("watercolour", "watercolor", "pastel", "soft", "dream"),
    "sketch": ("sketch", "pencil", "ink", "drawing"),
    "poster": ("poster", "pop", "comic"),
    "negative": ("negative", "invert", "xray"),
}
"""The words the tiny model was trained to answer, by look. Any other word does nothing."""
TEXTURE_LOOKS = ("soft", "sketch", "poster", "negative")

FILLER_WORDS = (
    "a", "an", "the", "of", "in", "at", "with", "and", "on", "city", "street", "portrait", "face",
    "landscape", "mountain", "cat", "dog", "house", "room", "tree", "sky", "boats", "roaring",
    "blazing", "painting", "photo", "light", "over", "by",
)
"""Words the training captions use around the look words, trained to change nothing."""


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: merge the lowest-ranked adjacent pair until none is left."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_merges() -> list[str]:
    """`_MERGES`, then merges that make every look and filler word one token.

    Each word's merges are appended after all earlier ones, joining the pieces the merges so far
    leave, so they never change how an earlier word splits (a later merge only applies once no
    earlier one can)."""
    merges = list(_MERGES)
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    for word in sorted({w for words in TINY_LOOKS.values() for w in words} | set(FILLER_WORDS)):
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append(f"{parts[0]} {parts[1]}")
            parts[0:2] = [parts[0] + parts[1]]
    return merges


def weights_id() -> str:
    """8 hex digits naming the shipped weights (from the sha256 list in their manifest)."""
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(manifest["sha256"], sort_keys=True).encode()).hexdigest()[:8]


def tiny_model_dir() -> Path:
    # The weights' id in the name: a retrained set never reuses a cached copy of an older one.
    return cache_dir() / "models" / f"tiny-v{TINY_FORMAT}-{weights_id()}"


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
    merges = tokenizer_merges()
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
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


def tiny_modules(vocab_size: int) -> dict[str, Any]:
    """The tiny model's networks, freshly initialised from `TINY_SEED` (the global RNG is restored).

    The training script starts from exactly these; `build_tiny_model` loads the trained weights
    into them."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
        vae_tiny, vae = tiny_vaes()
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
    return {"unet": unet, "vae_tiny": vae_tiny, "vae": vae, "text_encoder": text_encoder}


def tiny_vaes(scaling_factor: float = 0.18215) -> tuple[Any, Any]:
    """(TAESD-class AutoencoderTiny, full AutoencoderKL) of the tiny models, initialised from the
    global RNG (the callers seed it). `scaling_factor`: SD's 0.18215, SDXL's 0.13025."""
    from diffusers import AutoencoderKL, AutoencoderTiny

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
        scaling_factor=scaling_factor,
    )
    return vae_tiny, vae


def save_vaes(folder: Path, vae_tiny: Any, vae: Any) -> None:
    """Write both VAEs into a diffusers model folder (`vae_tiny/`, `vae/`)."""
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    vae_tiny.save_pretrained(folder / "vae_tiny", safe_serialization=True)
    # AutoencoderTiny records a `block_out_channels` alias it then rejects (with a warning) on
    # every load; published TAESD configs do not carry it.
    vae_config = folder / "vae_tiny" / "config.json"
    config = json.loads(vae_config.read_text(encoding="utf-8"))
    config.pop("block_out_channels", None)
    vae_config.write_text(json.dumps(config, indent=2), encoding="utf-8")


def tiny_scheduler() -> Any:
    """The tiny model's LCM scheduler (SD1.5's beta schedule); training uses its schedule too."""
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


TRAINED = ("unet", "vae_tiny", "text_encoder")
"""The components with trained weights; the full AutoencoderKL (`vae/`) keeps its seeded
random initialisation: the tiny model always runs with its own tiny VAE."""


def load_trained_weights(modules: dict[str, Any], folder: Path = WEIGHTS_DIR) -> None:
    """Load `folder/<name>.safetensors` (stored in float16 to stay small) into each module."""
    from safetensors.torch import load_file

    for name in TRAINED:
        module = modules[name]
        state = load_file(folder / f"{name}.safetensors")
        reference = module.state_dict()
        module.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=True)


def build_tiny_model(folder: Path, weights: Path = WEIGHTS_DIR) -> None:
    """Write the tiny model (trained weights from `weights`, tokenizer, scheduler) as a diffusers folder."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    modules = tiny_modules(vocab_size)
    load_trained_weights(modules, weights)
    unet, vae, vae_tiny, text_encoder = (modules[k] for k in ("unet", "vae", "vae_tiny", "text_encoder"))

    scheduler = tiny_scheduler()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    save_vaes(folder, vae_tiny, vae)
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
        json.dumps({"format": TINY_FORMAT, "seed": TINY_SEED, "weights": "trained"}), encoding="utf-8"
    )
