"""Model loading: hub id, local diffusers folder, single .safetensors checkpoint, or `tiny`.

Every kind ends in the same place: a local diffusers-layout folder loaded component by
component with safetensors only (never pickle). A hub id is first resolved to its cached
snapshot; the embedded `tiny` model is built into the user cache and loaded like any folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamnode.config import is_openvino_device
from streamnode.diffusion.tiny import MODEL_MAX_LENGTH, ensure_tiny_model

logger = logging.getLogger(__name__)

DEFAULT_TINY_VAE = "madebyollin/taesd"
"""TAESD for SD1.x and SD2.x latents (sd-turbo included)."""

_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_NEVER_DOWNLOAD = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5"]


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line and says what to do instead."""


@dataclass
class ModelComponents:
    """The parts of a Stable Diffusion model the stream engine drives, on one device and dtype."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderTiny or AutoencoderKL
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler: Any  # LCMScheduler
    device: torch.device
    dtype: torch.dtype
    tiny_vae: bool
    identity: str
    """Stable description of the weights (model, VAE, LoRA): part of the TensorRT cache key."""

    @property
    def vae_scaling_factor(self) -> float:
        # TAESD latents are already in the UNet's scale (factor 1.0); the full VAE's are not.
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for every SD1/SD2-class VAE)."""
        if self.tiny_vae:
            return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def model_max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, MODEL_MAX_LENGTH))

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 77, cross_attention_dim) last hidden states, CLIP-truncated at 77 tokens."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, 3, H, W) → UNet-scale latents z = s·E(I)."""
        if self.tiny_vae:
            return self.vae.encode(image).latents * self.vae_scaling_factor
        return self.vae.encode(image).latent_dist.mean * self.vae_scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-scale latents → image in roughly [-1, 1], (B, 3, H, W)."""
        return self.vae.decode(latents / self.vae_scaling_factor).sample


def resolve_device(spec: str = "auto") -> torch.device:
    """The PyTorch device for `model.device`. An OpenVINO device (CPU, GPU, NPU) keeps the PyTorch
    model on the CPU: OpenVINO compiles from it, and it serves any call OpenVINO cannot take."""
    if is_openvino_device(spec):
        return torch.device("cpu")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def configure_cpu_threads(requested: int | None = None) -> int:
    """Set torch's CPU thread count to `requested`; return the count in force.

    None leaves torch's default (one thread per physical core): a program that uses the engine
    as a library gets the whole machine. The node passes its own budget (`node_cpu_threads`).
    `OMP_NUM_THREADS`, when set and nothing is requested, is the user's word and is kept.
    """
    if requested is None:
        return torch.get_num_threads()
    if torch.get_num_threads() != requested:
        torch.set_num_threads(requested)
    return requested


def node_cpu_threads(cores: int | None = None) -> int:
    """torch's thread budget inside the node on a CPU device: half the cores, at least one.

    torch's OpenMP workers spin at every barrier: when a capture or sink thread (or any other
    process) holds one of their cores, a UNet of many small ops slows down by 50× or more
    (measured on 2 cores: 1.7 s instead of 20 ms). The node's other threads get the rest.
    OpenVINO's own pool does not spin that way; its budget is `model.cpu_threads` or every
    core (see docs/acceleration.md, "Threads", for the measurements).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, (cores or os.cpu_count() or 2) // 2)


def resolve_dtype(spec: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        # fp16 convolutions on the CPU are slow or missing; fp16 is the GPU default.
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec]


def _offline_hint(name: str) -> str:
    return (
        f"model {name!r} is not on this machine and could not be downloaded "
        "(offline?); use --model tiny, a local diffusers folder, or a .safetensors file"
    )


def resolve_hub_snapshot(repo_id: str) -> Path:
    """A hub id → its local snapshot folder (safetensors and configs only), downloading if allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_WEIGHT_PATTERNS))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(_offline_hint(repo_id))
    try:
        logger.info("downloading %s (safetensors only)", repo_id)
        return Path(
            snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, ignore_patterns=_NEVER_DOWNLOAD)
        )
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        raise ModelLoadError(f"{_offline_hint(repo_id)} ({type(e).__name__})") from None


def _identity_of(path: Path) -> str:
    """Cheap, content-sensitive fingerprint of every safetensors file under `path`.

    Hashing gigabytes at each start would cost seconds; names, sizes and the first and last
    MiB of each file change whenever the weights do.
    """
    digest = hashlib.sha256()
    # Configs too: the same weights under another architecture setting are another model.
    files = [path] if path.is_file() else sorted([*path.rglob("*.safetensors"), *path.rglob("config.json")])
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _load_folder(path: Path, variant: str | None, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (no {sub}/); give a folder with "
                "unet/ vae/ text_encoder/ tokenizer/ scheduler/, a .safetensors file, or --model tiny"
            )
    kw: dict[str, Any] = {"use_safetensors": True, "torch_dtype": dtype}
    if variant and any((path / "unet").glob(f"*.{variant}.safetensors")):
        kw["variant"] = variant
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(path / "unet", **kw),
            "vae": AutoencoderKL.from_pretrained(path / "vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer"),
            # Whatever scheduler the model shipped with, the stream engine steps with LCM.
            "scheduler": LCMScheduler.from_config(LCMScheduler.load_config(path / "scheduler")),
        }
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load {path}: {str(e).splitlines()[0]}") from None


def _load_single_file(path: Path) -> dict[str, Any]:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - diffusers needs the base config, which may be uncached
        raise ModelLoadError(
            f"could not load {path.name}: {str(e).splitlines()[0][:200]}; convert it to a diffusers "
            "folder once on a machine with internet, or use --model tiny"
        ) from None
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": LCMScheduler.from_config(pipe.scheduler.config),
    }


def _load_tiny_vae(source: str | Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderTiny

    path = Path(source)
    if not path.exists():
        path = resolve_hub_snapshot(str(source))
    try:
        return AutoencoderTiny.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tiny VAE {source}: {str(e).splitlines()[0]}") from None


def _fuse_lora(parts: dict[str, Any], lora: str) -> None:
    from diffusers import StableDiffusionPipeline

    path = Path(lora)
    if path.is_file() and path.suffix != ".safetensors":
        raise ModelLoadError(f"{lora}: LoRA weights are loaded from .safetensors only")
    source = str(path if path.exists() else resolve_hub_snapshot(lora))
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    try:
        pipe.load_lora_weights(source, adapter_name="lcm", use_safetensors=True)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    except Exception as e:  # noqa: BLE001 - peft/diffusers raise many types for a bad LoRA
        raise ModelLoadError(f"could not fuse LoRA {lora}: {str(e).splitlines()[0][:200]}") from None


def load_components(
    model: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    use_tiny_vae: bool = True,
    tiny_vae: str | None = None,
    lcm_lora: str | None = None,
    cpu_threads: int | None = None,
) -> ModelComponents:
    """Load `model` (hub id, folder, .safetensors or 'tiny') onto `device` in `dtype`, in eval mode.

    On a CPU device `cpu_threads` sets torch's thread count (None: torch's default, every
    physical core), and the TAESD-class VAE is put in channels-last memory: oneDNN's NHWC
    convolutions run it about twice as fast (measured: encode 85 → 45 ms at 256², 1 thread).
    """
    from transformers.utils import logging as transformers_logging

    # Per-shard progress bars are noise in a daemon's log (and in a show's terminal).
    transformers_logging.disable_progress_bar()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu":
        configure_cpu_threads(cpu_threads)

    path = Path(model).expanduser()
    if model == "tiny":
        path = ensure_tiny_model()
        parts = _load_folder(path, None, dt)
    elif path.is_file():
        parts = _load_single_file(path)
    elif path.is_dir():
        parts = _load_folder(path, "fp16" if dt == torch.float16 else None, dt)
    elif model.count("/") == 1 and not model.startswith((".", "/", "~")):
        path = resolve_hub_snapshot(model)
        parts = _load_folder(path, "fp16" if dt == torch.float16 else None, dt)
    else:
        raise ModelLoadError(f"model {model!r}: no such file or folder, and not a hub id like owner/name")

    identity = [f"{model}@{_identity_of(path)}"]
    if lcm_lora:
        _fuse_lora(parts, lcm_lora)
        identity.append(f"lora={lcm_lora}")
    if use_tiny_vae:
        vae_source = tiny_vae or (path / "vae_tiny" if (path / "vae_tiny").is_dir() else DEFAULT_TINY_VAE)
        parts["vae"] = _load_tiny_vae(vae_source, dt)
        identity.append(f"taesd={Path(str(vae_source)).name}")
    else:
        identity.append("vae=full")

    for name in ("unet", "vae", "text_encoder"):
        # Loaded in `dt` already (from_pretrained's torch_dtype); a single-file checkpoint may not be.
        module = parts[name]
        if next(module.parameters()).dtype != dt:
            module = module.to(dtype=dt)
        parts[name] = module.to(device=dev).eval().requires_grad_(False)
    if dev.type == "cpu" and use_tiny_vae:
        # The engine hands the VAE channels-last images and latents already (stream.py).
        parts["vae"] = parts["vae"].to(memory_format=torch.channels_last)
    logger.info("loaded %s on %s (%s, %s VAE)", model, dev, str(dt).removeprefix("torch."),
                "tiny" if use_tiny_vae else "full")
    return ModelComponents(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"],
        device=dev,
        dtype=dt,
        tiny_vae=use_tiny_vae,
        identity="|".join(identity),
    )
