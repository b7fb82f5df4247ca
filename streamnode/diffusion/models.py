"""Model loading: hub id, local diffusers folder, single .safetensors checkpoint, `tiny` or `tiny-sdxl`.

Every kind ends in the same place: a local diffusers-layout folder loaded component by
component with safetensors only (never pickle). A hub id is first resolved to its cached
snapshot; the embedded `tiny` and `tiny-sdxl` models are built into the user cache and loaded
like any folder.

The model family (`FAMILIES`: SD1.x/SD2.x, or SDXL) is read from what the folder declares, never
guessed from its name: the UNet's config (`addition_embed_type="text_time"` is SDXL's pooled and
size conditioning), the components `model_index.json` lists and the class each declares
(`inspect_folder`). A declared class is the class loaded: a `vae/` that is an `AutoencoderTiny`
is loaded as the tiny VAE it is. The full VAE is not read at all when a tiny one replaces it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from streamnode.config import is_openvino_device
from streamnode.diffusion.conditioning import TextConditioning, for_components
from streamnode.diffusion.tiny import MODEL_MAX_LENGTH, ensure_tiny_model
from streamnode.diffusion.tiny_sdxl import ensure_tiny_sdxl_model

logger = logging.getLogger(__name__)

FAMILIES: dict[str, str] = {
    "sd": "SD1.x / SD2.x UNets: sd-turbo, SD1.5 and SD2 fine-tunes (+ LCM-LoRA); one CLIP text encoder",
    "sdxl": "SDXL UNets: SDXL-Turbo, SDXL and its fine-tunes (+ LCM-LoRA); two text encoders, pooled "
    "embedding and size ids",
}
"""The model families the loader reads, by the name `ModelComponents.family` reports."""

TINY_VAE_BY_FAMILY: dict[str, str] = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
"""The tiny VAE each family's latents need when the model folder has none (TAESD, TAESDXL)."""
DEFAULT_TINY_VAE = TINY_VAE_BY_FAMILY["sd"]

EMBEDDED = {"tiny": ensure_tiny_model, "tiny-sdxl": ensure_tiny_sdxl_model}
"""`--model` names of the embedded, randomly initialised CPU-sized models (one per family)."""

_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL", "AutoencoderTiny"),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
"""The classes each component may declare; anything else is refused with its name."""

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
    text_encoder_2: Any = None  # CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any = None  # CLIPTokenizer (SDXL)
    zero_empty_negative: bool = False
    """The model declares `force_zeros_for_empty_prompt`: no negative prompt means zeros (SDXL)."""
    vae_dtype: torch.dtype | None = None
    """The VAE's own dtype when it differs from `dtype` (SDXL's full VAE overflows in float16)."""

    @functools.cached_property
    def conditioning(self) -> TextConditioning:
        """Prompts → the UNet's conditioning, for this model's family (conditioning.py)."""
        return for_components(self)

    @property
    def family(self) -> str:
        """"sd" (SD1.x/SD2.x) or "sdxl", from the UNet's declared conditioning (`FAMILIES`)."""
        return self.conditioning.family

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

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, cross_attention_dim) packed prompt embeddings, CLIP-truncated at
        77 tokens: SD1/SD2 the last hidden states (tokens = 77); SDXL both encoders' penultimate
        hidden states side by side plus one row holding the pooled embedding (tokens = 78,
        conditioning.py)."""
        return self.conditioning.encode(prompts)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, 3, H, W) → UNet-scale latents z = s·E(I)."""
        if self.vae_dtype is not None:
            image = image.to(self.vae_dtype)
        if self.tiny_vae:
            z = self.vae.encode(image).latents * self.vae_scaling_factor
        else:
            z = self.vae.encode(image).latent_dist.mean * self.vae_scaling_factor
        return z if self.vae_dtype is None else z.to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-scale latents → image in roughly [-1, 1], (B, 3, H, W)."""
        if self.vae_dtype is not None:
            latents = latents.to(self.vae_dtype)
        image = self.vae.decode(latents / self.vae_scaling_factor).sample
        return image if self.vae_dtype is None else image.to(self.dtype)


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


# -- what a folder declares ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """What a diffusers model folder declares: its pipeline class, each component's class, the family."""

    path: Path
    pipeline: str
    classes: dict[str, str]
    family: str
    zero_empty_negative: bool

    @property
    def tiny_vae_declared(self) -> bool:
        return self.classes.get("vae") == "AutoencoderTiny"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data


def _declared_class(folder: Path) -> str | None:
    """The class a component subfolder's own config declares (diffusers, transformers or tokenizer config)."""
    for name, key in (("config.json", "_class_name"), ("scheduler_config.json", "_class_name"),
                      ("config.json", "architectures"), ("tokenizer_config.json", "tokenizer_class")):
        if (folder / name).is_file():
            value = _read_json(folder / name).get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, str):
                return value
    return None


def inspect_folder(path: Path) -> ModelLayout:
    """Read the family and the declared classes of a diffusers folder; raise ModelLoadError (one
    line, naming what is wrong and what loads instead) for anything the stream engine cannot run.

    `model_index.json` lists the components and their classes; without one, each subfolder's own
    config says its class. The family comes from the UNet's config: `addition_embed_type` None is
    SD1.x/SD2.x, "text_time" is SDXL; the pipeline's name is only quoted in messages.
    """
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name") or "a diffusers folder")
    classes: dict[str, str] = {}
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
            classes[name] = str(entry[1])
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if sub not in classes and (path / sub).is_dir() and (declared := _declared_class(path / sub)):
            classes[sub] = declared
    families = "; ".join(FAMILIES.values())
    if not (path / "unet").is_dir():
        other = next((s for s in ("transformer", "prior", "decoder") if (path / s).is_dir()), None)
        if other is not None or index:
            raise ModelLoadError(
                f"{path}: {pipeline} has no UNet{f' (its denoiser is {other}/)' if other else ''}; streamnode "
                f"loads {families}"
            )
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (no {sub}/); give a folder with "
                "unet/ vae/ text_encoder/ tokenizer/ scheduler/, a .safetensors file, or --model tiny"
            )
    for sub, allowed in _CLASSES.items():
        if sub in classes and classes[sub] not in allowed:
            raise ModelLoadError(
                f"{path}: {sub}/ is a {classes[sub]}; streamnode loads {sub} as {' or '.join(allowed)} ({families})"
            )
    unet_config = _read_json(path / "unet" / "config.json")
    addition = unet_config.get("addition_embed_type")
    if unet_config.get("time_cond_proj_dim"):
        raise ModelLoadError(
            f"{path}: this UNet expects a guidance embedding (a full LCM model such as LCM_Dreamshaper); "
            "use its base model with lcm_lora=... instead"
        )
    if int(unet_config.get("in_channels", 4)) != 4:
        raise ModelLoadError(
            f"{path}: the UNet takes {unet_config.get('in_channels')} input channels (an inpainting or "
            "depth model); streamnode streams 4-channel img2img UNets"
        )
    if addition is None:
        family = "sd"
    elif addition == "text_time":
        if unet_config.get("projection_class_embeddings_input_dim") and not (path / "text_encoder").is_dir():
            raise ModelLoadError(f"{path}: an SDXL refiner (no first text encoder) is not a stream model; use an SDXL base or turbo model")
        family = "sdxl"
        for sub in ("text_encoder_2", "tokenizer_2"):
            if not (path / sub).is_dir():
                raise ModelLoadError(f"{path}: an SDXL UNet (text_time conditioning) needs {sub}/, which is missing")
    else:
        raise ModelLoadError(
            f"{path}: the UNet's addition_embed_type is {addition!r}; streamnode loads {families}"
        )
    return ModelLayout(path, pipeline, classes, family, bool(index.get("force_zeros_for_empty_prompt", False)))


def _load_folder(layout: ModelLayout, variant: str | None, dtype: torch.dtype, *, full_vae: bool) -> dict[str, Any]:
    """Load every component `layout` declares (the full VAE only with `full_vae`)."""
    import diffusers
    import transformers
    from diffusers import LCMScheduler

    path = layout.path
    kw: dict[str, Any] = {"use_safetensors": True, "torch_dtype": dtype}
    if variant and any((path / "unet").glob(f"*.{variant}.safetensors")):
        kw["variant"] = variant

    def model(sub: str, library: Any, default: str) -> Any:
        cls = getattr(library, layout.classes.get(sub, default))
        sub_kw = dict(kw)
        if "variant" in sub_kw and not any((path / sub).glob(f"*.{variant}.safetensors")):
            del sub_kw["variant"]
        return cls.from_pretrained(path / sub, **sub_kw)

    def tokenizer(sub: str) -> Any:
        # The slow and fast CLIP tokenizers give the same ids; CLIPTokenizer is what every version ships.
        return transformers.CLIPTokenizer.from_pretrained(path / sub)

    try:
        parts: dict[str, Any] = {
            "unet": model("unet", diffusers, "UNet2DConditionModel"),
            "text_encoder": model("text_encoder", transformers, "CLIPTextModel"),
            "tokenizer": tokenizer("tokenizer"),
            # Whatever scheduler the model shipped with, the stream engine steps with LCM.
            "scheduler": LCMScheduler.from_config(LCMScheduler.load_config(path / "scheduler")),
            "vae": model("vae", diffusers, "AutoencoderKL") if full_vae or layout.tiny_vae_declared else None,
        }
        if layout.family == "sdxl":
            parts["text_encoder_2"] = model("text_encoder_2", transformers, "CLIPTextModelWithProjection")
            parts["tokenizer_2"] = tokenizer("tokenizer_2")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    return parts


class _ShapeIndex(Mapping[str, Any]):
    """A safetensors checkpoint's tensor names and shapes, without reading the tensors: enough for
    diffusers' model-type detection, which only looks at names and shapes."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict

    def __getitem__(self, key: str) -> Any:
        return SimpleNamespace(shape=self._shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def single_file_family(path: Path) -> str:
    """The family of a single-file checkpoint, from the tensors it holds (names and shapes)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(_ShapeIndex(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        raise ModelLoadError(f"{path.name}: not a readable safetensors checkpoint ({type(e).__name__})") from None
    if kind in ("v1", "v2"):
        return "sd"
    if kind == "xl_base":
        return "sdxl"
    raise ModelLoadError(
        f"{path.name}: a {kind} checkpoint; streamnode loads {'; '.join(FAMILIES.values())}"
    )


def _load_single_file(path: Path, family: str, vae: Any) -> dict[str, Any]:
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"vae": vae} if vae is not None else {}
    try:
        pipe = pipeline_class.from_single_file(str(path), local_files_only=True, use_safetensors=True, **extra)
    except Exception as e:  # noqa: BLE001 - diffusers needs the base config, which may be uncached
        raise ModelLoadError(
            f"could not load {path.name} ({family} checkpoint): {str(e).splitlines()[0][:200]}; convert it to a "
            "diffusers folder once on a machine with internet, or use --model tiny"
        ) from None
    parts = {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": LCMScheduler.from_config(pipe.scheduler.config),
    }
    if family == "sdxl":
        parts["text_encoder_2"], parts["tokenizer_2"] = pipe.text_encoder_2, pipe.tokenizer_2
    return parts


def _load_tiny_vae(source: str | Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderTiny

    path = Path(source)
    if not path.exists():
        path = resolve_hub_snapshot(str(source))
    try:
        return AutoencoderTiny.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tiny VAE {source}: {str(e).splitlines()[0]}") from None


def _fuse_lora(unet: Any, lora: str) -> None:
    """Merge a LoRA into the UNet's weights for good (LCM-LoRA at load): lora.py's reader and merge."""
    from streamnode.diffusion.lora import LoraError, fuse_into, read_lora

    try:
        fuse_into(unet, read_lora(lora, unet))
    except LoraError as e:
        raise ModelLoadError(f"could not fuse LoRA {lora}: {e}") from None


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
    """Load `model` (hub id, folder, .safetensors, 'tiny' or 'tiny-sdxl') onto `device` in `dtype`, in eval mode.

    The family (SD1/SD2 or SDXL) and every component's class are read from the model itself
    (`inspect_folder`, `single_file_family`). With `use_tiny_vae` the full VAE is never read: the
    tiny one is `tiny_vae`, else the folder's own (`vae/` declared AutoencoderTiny, or
    `vae_tiny/`), else the family's TAESD (`TINY_VAE_BY_FAMILY`). On a CPU device `cpu_threads`
    sets torch's thread count (None: torch's default, every physical core), and the TAESD-class
    VAE is put in channels-last memory: oneDNN's NHWC convolutions run it about twice as fast
    (measured: encode 85 → 45 ms at 256², 1 thread).
    """
    from transformers.utils import logging as transformers_logging

    # Per-shard progress bars are noise in a daemon's log (and in a show's terminal).
    transformers_logging.disable_progress_bar()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu":
        configure_cpu_threads(cpu_threads)

    path = Path(model).expanduser()
    variant = "fp16" if dt == torch.float16 else None
    if model in EMBEDDED:
        path, variant = EMBEDDED[model](), None
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    elif path.is_dir():
        pass
    elif model.count("/") == 1 and not model.startswith((".", "/", "~")):
        path = resolve_hub_snapshot(model)
    else:
        raise ModelLoadError(f"model {model!r}: no such file or folder, and not a hub id like owner/name")

    identity = [f"{model}@{_identity_of(path)}"]
    if path.is_file():
        family = single_file_family(path)
        zero_negative = family == "sdxl"  # what diffusers' SDXL pipeline config declares
        own_tiny = None
        small = _load_tiny_vae(tiny_vae or TINY_VAE_BY_FAMILY[family], dt) if use_tiny_vae else None
        parts = _load_single_file(path, family, small)
    else:
        layout = inspect_folder(path)
        family, zero_negative = layout.family, layout.zero_empty_negative
        own_tiny = path / "vae_tiny" if (path / "vae_tiny").is_dir() else None
        parts = _load_folder(layout, variant, dt, full_vae=not use_tiny_vae)
        if layout.tiny_vae_declared and tiny_vae is None:
            if not use_tiny_vae:
                logger.info("%s: its vae/ is a tiny VAE (AutoencoderTiny); using it", model)
            use_tiny_vae, own_tiny = True, path / "vae"
        elif use_tiny_vae:
            parts["vae"] = _load_tiny_vae(tiny_vae or own_tiny or TINY_VAE_BY_FAMILY[family], dt)

    if lcm_lora:
        _fuse_lora(parts["unet"], lcm_lora)
        identity.append(f"lora={lcm_lora}")
    if use_tiny_vae:
        vae_source = tiny_vae or own_tiny or TINY_VAE_BY_FAMILY[family]
        identity.append(f"taesd={Path(str(vae_source)).name}")
    else:
        identity.append("vae=full")

    vae_dtype = None
    if family == "sdxl" and not use_tiny_vae and dt == torch.float16 and getattr(parts["vae"].config, "force_upcast", False):
        # SDXL's own VAE overflows in float16 (NaN images); it runs in float32, as diffusers upcasts it.
        vae_dtype = torch.float32
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        # Loaded in `dt` already (from_pretrained's torch_dtype); a single-file checkpoint may not be.
        module = parts.get(name)
        if module is None:
            continue
        want = vae_dtype if name == "vae" and vae_dtype is not None else dt
        if next(module.parameters()).dtype != want:
            module = module.to(dtype=want)
        parts[name] = module.to(device=dev).eval().requires_grad_(False)
    if dev.type == "cpu" and use_tiny_vae:
        # The engine hands the VAE channels-last images and latents already (stream.py).
        parts["vae"] = parts["vae"].to(memory_format=torch.channels_last)
    logger.info("loaded %s on %s (%s, %s, %s VAE)", model, dev, family, str(dt).removeprefix("torch."),
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
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        zero_empty_negative=zero_negative,
        vae_dtype=vae_dtype,
    )
