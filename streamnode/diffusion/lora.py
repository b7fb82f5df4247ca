"""A live stack of LoRAs on the UNet, each with its own weight: runtime adapters or merged weights.

A LoRA adds a low-rank update to some of the UNet's linear and convolution layers. For layer m
and LoRA i (rank r_i, factors down A_i and up B_i, scale α_i/r_i as trained, live weight w_i):

    W_m  =  W0_m + Σ_i  w_i · (α_i / r_i) · B_i A_i

Two ways to apply it (`mode`, fixed per engine):

- **runtime**: the base weights stay; every touched layer gets a forward hook adding
  Σ_i w_i·(α_i/r_i)·B_i(A_i x). The LoRAs of a layer are concatenated (A_cat, B_cat: one pair of
  matmuls per layer whatever their number), and the weights live in one device vector of
  per-rank scales, so a weight change is one small copy and shows on the next frame. Cost per
  frame: two thin matmuls per touched layer (for a rank-32 SDXL style LoRA on every attention
  projection, a few percent of the UNet). Adding or removing a LoRA rebuilds the concatenations.
- **merged**: the update is added into the weights themselves, W_m = W0_m + Σ…, so a frame costs
  exactly what the base model costs. A weight change re-merges every touched layer (one
  (out × r)·(r × in) product each) off the engine thread and copies the results in place at a
  frame boundary; W0 of every touched layer is kept to merge from (memory: one copy of the
  touched weights).

Edits are two-phase like the engine's other heavy parameters: `plan()` reads a new file and
computes everything the edit needs (concatenations or merged weights) without touching the UNet
or the stack, so it may run on another thread; `commit()` applies a plan between two frames
(pointer swaps, or in-place copies for merged weights: the addresses the UNet's kernels, CUDA
graphs and compiled graphs read never change). A plan made while another edit was committed is
stale: `commit()` refuses it and the caller plans again from the weights already read.

Files (`read_lora`): .safetensors only (never pickle), a file, a folder holding one, or a hub id;
diffusers, PEFT and kohya/A1111 key layouts (diffusers' own converter), alphas from the file
(kohya's per-layer alpha, or the PEFT config diffusers writes into the header). Only the UNet
part is applied; a LoRA's text-encoder part (if any) is skipped with one log line. Every layer
must exist in this UNet with the shapes the LoRA was trained on: a LoRA for another base model
is refused, naming a layer that does not fit. LoHa/LoKr/DoRA files are refused.

The stack modifies the UNet it was built on: an engine with LoRAs owns its components' UNet,
and `close()` gives it back as loaded (hooks removed, W0 copied back).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from streamnode.live_params import LoraParams, validated

logger = logging.getLogger(__name__)

LoraMode = Literal["runtime", "merged"]
LORA_MODES: tuple[str, ...] = ("runtime", "merged")
_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_METADATA_KEY = "lora_adapter_metadata"
"""Where diffusers writes a LoRA's PEFT config (rank, alpha, patterns) in the safetensors header."""


class LoraError(ValueError):
    """A LoRA that cannot be used; the message is one line naming the file and what is wrong."""


@dataclass(frozen=True, eq=False)
class Factors:
    """One layer's update: down (r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1), with
    α/r folded into `up`."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """B·A as a weight of the layer's shape (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).view(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A LoRA read for one UNet: its layers' factors on the UNet's device and dtype."""

    source: str
    factors: Mapping[str, Factors]
    skipped: int = 0
    """Tensors of the file not applied (its text-encoder part)."""


# -- reading ---------------------------------------------------------------------------------


def _resolve(source: str) -> Path:
    """A LoRA source → its .safetensors file: a file, a folder holding one, or a hub id."""
    path = Path(source).expanduser()
    if path.suffix.lower() in _PICKLE:
        raise LoraError(f"{source}: LoRA weights are read from .safetensors only (pickle files can run code)")
    if not path.exists():
        if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.suffix:
            from streamnode.diffusion.models import ModelLoadError, resolve_hub_snapshot

            try:
                path = resolve_hub_snapshot(source)
            except ModelLoadError as e:
                raise LoraError(str(e).replace("model ", "LoRA ", 1)) from None
        else:
            raise LoraError(f"{source}: no such LoRA file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if preferred or len(files) == 1:
            return (preferred or files)[0]
        if not files:
            pickles = [f.name for f in path.iterdir() if f.suffix in _PICKLE]
            hint = f" ({', '.join(pickles[:2])}: pickle, not read)" if pickles else ""
            raise LoraError(f"{source}: no .safetensors file in this folder{hint}")
        raise LoraError(f"{source}: {len(files)} .safetensors files here; name the one to use")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{source}: LoRA weights are read from .safetensors only (pickle files can run code)")
    return path


_KEY_FORMS = (
    (re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$"), None),  # PEFT (optionally an adapter name)
    (re.compile(r"^(.*)\.lora(?:_linear_layer)?\.(down|up)\.weight$"), None),  # diffusers (old), kohya converted
    (re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"), "processor"),  # attn procs
)


def _layer_of(key: str) -> tuple[str, str] | None:
    """A LoRA tensor name → (UNet layer name, "down" or "up"); None if it is not a factor."""
    for pattern, form in _KEY_FORMS:
        m = pattern.match(key)
        if m is None:
            continue
        if form == "processor":
            layer = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
            return layer, m.group(3)
        part = m.group(2)
        return m.group(1), {"A": "down", "B": "up"}.get(part, part)
    return None


def _alpha_layer(key: str) -> str:
    """An alpha's name (`<layer>.alpha`, or a processor factor's name + `.alpha`) → the layer."""
    stem = key.removeprefix("unet.").removesuffix(".alpha")
    found = _layer_of(stem)
    return found[0] if found else stem


def _pattern_value(patterns: Mapping[str, Any], layer: str, default: Any) -> Any:
    """PEFT's rank/alpha patterns: a pattern applies to a layer whose name ends with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def read_lora(source: str, unet: Any, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> LoraWeights:
    """Read a LoRA for `unet`: its UNet layers' factors (α/r folded into `up`) on the UNet's device
    and dtype. Raises LoraError (one line) for a missing or pickle file, an unknown layout, or a
    LoRA made for another base model. Safe on any thread: it only reads the UNet's layer shapes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _resolve(source)
    try:
        raw = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        raise LoraError(f"{source}: not a readable safetensors file ({type(e).__name__})") from None
    keys = list(raw)
    if any(k in s for k in ("hada_w", "lokr_w", "dora_scale", "lora_magnitude_vector") for s in keys):
        raise LoraError(f"{source}: a LoHa/LoKr/DoRA file; streamnode applies plain LoRAs (down/up factor pairs)")
    try:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        # diffusers' converter: kohya/A1111 names (SD and SDXL block layouts) → diffusers layer names.
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw), unet_config=unet.config)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError/KeyError for foreign layouts
        raise LoraError(f"{source}: not a LoRA layout streamnode reads ({str(e).splitlines()[0][:160]})") from None
    config: dict[str, Any] = {}
    if header.get(_METADATA_KEY):
        try:
            meta = json.loads(header[_METADATA_KEY])
            config = {k.removeprefix("unet."): v for k, v in meta.items() if not k.startswith("text_encoder")}
        except (ValueError, AttributeError):
            config = {}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped = 0
    for key, tensor in state.items():
        if not key.startswith("unet.") and key.split(".", 1)[0] in ("text_encoder", "text_encoder_2"):
            skipped += 1
            continue
        found = _layer_of(key.removeprefix("unet."))
        if found is None:
            if key.endswith(".bias"):
                raise LoraError(f"{source}: LoRA biases ({key}) are not supported")
            skipped += 1
            continue
        layer, part = found
        pairs.setdefault(layer, {})[part] = tensor
    layer_alphas = {_alpha_layer(k): float(v) for k, v in (alphas or {}).items() if not k.startswith("text_encoder")}
    if not pairs:
        raise LoraError(f"{source}: no UNet layers in this LoRA (text-encoder only, or not a LoRA)")

    modules = dict(unet.named_modules())
    dev = device or next(unet.parameters()).device
    dt = dtype or next(unet.parameters()).dtype
    factors: dict[str, Factors] = {}
    misfits: list[str] = []
    for layer, parts in pairs.items():
        if set(parts) != {"down", "up"}:
            raise LoraError(f"{source}: layer {layer} has only its {'/'.join(parts)} factor")
        down, up = parts["down"], parts["up"]
        module = modules.get(layer)
        fitted = _fit(module, down, up)
        if fitted is None:
            misfits.append(f"{layer}: LoRA {tuple(up.shape[:1])}×{tuple(down.shape[1:])}"
                           + (f" vs UNet {tuple(module.weight.shape)}" if module is not None and hasattr(module, "weight")
                              else " (no such layer here)"))
            continue
        down, up = fitted
        rank = int(down.shape[0])
        alpha = layer_alphas.get(layer)
        if alpha is None:
            # No alpha in the file: PEFT's config if diffusers wrote one, else scale 1 (alpha = rank).
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", rank)))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        factors[layer] = Factors(down.to(dev, dt).contiguous(), (up.float() * scale).to(dev, dt).contiguous())
    if misfits:
        raise LoraError(
            f"{source} was made for another base model: {len(misfits)} of {len(pairs)} layers do not fit this UNet "
            f"(e.g. {misfits[0]})"
        )
    if skipped:
        logger.info("LoRA %s: %d tensors besides the UNet's (text encoders) are not applied", source, skipped)
    return LoraWeights(source, factors, skipped)


def _fit(module: Any, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The factors shaped for `module` (a 1×1 convolution takes linear factors and back), or None."""
    if isinstance(module, torch.nn.Linear):
        if down.dim() == 4 and down.shape[2:] == (1, 1) and up.dim() == 4:
            down, up = down.flatten(1), up.flatten(1)
        ok = down.dim() == 2 and up.dim() == 2 and down.shape[1] == module.in_features
        ok = ok and up.shape[0] == module.out_features and up.shape[1] == down.shape[0]
        return (down, up) if ok else None
    if isinstance(module, torch.nn.Conv2d) and module.groups == 1:
        if down.dim() == 2 and tuple(module.kernel_size) == (1, 1):
            down, up = down[:, :, None, None], up[:, :, None, None]
        if down.dim() != 4 or up.dim() != 4 or up.shape[2:] != (1, 1):
            return None
        ok = tuple(down.shape[1:]) == (module.in_channels, *module.kernel_size)
        ok = ok and up.shape[0] == module.out_channels and up.shape[1] == down.shape[0]
        return (down, up) if ok else None
    return None


def fuse_into(unet: Any, weights: LoraWeights, scale: float = 1.0) -> None:
    """Add a LoRA into the UNet's weights for good (LCM-LoRA at load time)."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for layer, f in weights.factors.items():
            w = modules[layer].weight
            w.copy_((w.float() + scale * f.delta()).to(w.dtype))


# -- the stack -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Slot:
    params: LoraParams
    weights: LoraWeights | None  # None: no source yet

    @property
    def gain(self) -> float:
        return float(self.params.weight) if self.params.enabled and self.weights is not None else 0.0


class _Adapter:
    """The runtime forward hook of one layer: y + B_cat((A_cat x) · s), s its per-rank scales."""

    def __init__(self, module: Any, down: torch.Tensor, up: torch.Tensor, scales: torch.Tensor) -> None:
        self.conv = isinstance(module, torch.nn.Conv2d)
        self.down, self.up = down, up
        self.scales = scales.view(1, -1, 1, 1) if self.conv else scales
        if self.conv:
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.conv:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
            return output + F.conv2d(h * self.scales, self.up)
        return output + F.linear(F.linear(x, self.down) * self.scales, self.up)


@dataclass(eq=False)
class LoraPlan:
    """Everything a stack edit needs, computed off the engine thread; applied by `LoraStack.commit`."""

    version: int
    slots: dict[int, _Slot]
    edit: tuple[int, dict[str, Any]]
    structure: bool
    """The set of LoRAs (or their files) changed: runtime rebuilds the hooks."""
    gains: list[float] = field(default_factory=list)
    # runtime: per layer (down_cat, up_cat, owner slot per rank); merged: per layer its new weight.
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = field(default_factory=dict)
    merged: dict[str, torch.Tensor] | None = None
    """merged mode: the new weight of every layer a LoRA touches (None: the weights stay as they are)."""
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    """merged: W0 of layers touched for the first time (copies made before any write)."""


class LoraStack:
    """The LoRAs of one engine's UNet (indices 0..max_loras−1), applied in `mode`.

    `params` is what is in force (an immutable mapping replaced whole). Edits: `plan()` (any
    thread) then `commit()` (the engine thread, between frames); `edit()` does both.
    """

    def __init__(self, unet: Any, *, mode: str = "runtime", max_loras: int = 8) -> None:
        if mode not in LORA_MODES:
            raise ValueError(f"lora mode {mode!r}: must be one of {', '.join(LORA_MODES)}")
        self.unet = unet
        self.mode = mode
        self.max_loras = max_loras
        self.version = 0
        self.merges = 0
        self._slots: dict[int, _Slot] = {}
        self._modules = dict(unet.named_modules())
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._hooks: dict[str, Any] = {}  # layer → hook handle (runtime)
        self._scales: torch.Tensor | None = None  # every hooked rank's scale, one vector (runtime)
        self._owner: torch.Tensor | None = None  # the slot of every rank in `_scales`
        self._base: dict[str, torch.Tensor] = {}  # layer → W0 (merged)
        self._lock = threading.Lock()  # one plan at a time reads `_base` and the layers' weights

    # -- what is in force

    @property
    def params(self) -> dict[int, LoraParams]:
        return {i: s.params for i, s in sorted(self._slots.items())}

    @property
    def active(self) -> int:
        """LoRAs with a file read (whatever their weight)."""
        return sum(1 for s in self._slots.values() if s.weights is not None)

    # -- edits

    def plan(self, index: int, fields: Mapping[str, Any], *, loaded: LoraWeights | None = None) -> LoraPlan:
        """Validate an edit of LoRA `index` (LoraParams fields, or {"clear": …}) and compute what it
        needs; touches nothing. `loaded`: the file already read for this edit's source."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.max_loras:
            raise ValueError(f"lora {index!r}: use 0..{self.max_loras - 1}")
        fields = dict(fields)
        with self._lock:
            version, slots = self.version, dict(self._slots)
            old = slots.get(index)
            if "clear" in fields:
                if len(fields) > 1:
                    raise ValueError("lora clear: give no other field with it")
                slots.pop(index, None)
                structure = old is not None and old.weights is not None
            else:
                current = old.params if old is not None else LoraParams()
                params = validated(LoraParams, {**current.model_dump(), **fields})
                weights = old.weights if old is not None else None
                structure = False
                if old is None or params.source != old.params.source:
                    if loaded is not None and loaded.source == params.source:
                        weights = loaded
                    else:
                        weights = read_lora(params.source, self.unet, device=self.device, dtype=self.dtype) if params.source else None
                    structure = True
                slots[index] = _Slot(params, weights)
            plan = LoraPlan(version, slots, (index, fields), structure)
            plan.gains = [slots[i].gain if i in slots else 0.0 for i in range(self.max_loras)]
            before = [self._slots[i].gain if i in self._slots else 0.0 for i in range(self.max_loras)]
            if self.mode == "runtime":
                if structure:
                    plan.layers = self._concatenate(slots)
            elif structure or plan.gains != before:
                self._merge(plan, self._base)
        return plan

    def commit(self, plan: LoraPlan) -> None:
        """Apply a plan between two frames. Raises StalePlan if another edit came first."""
        if plan.version != self.version:
            raise StalePlan("the LoRA stack changed since this edit was planned")
        if self.mode == "runtime":
            if plan.structure:
                self._install(plan.layers)
            self._set_scales(plan.gains)
        elif plan.merged is not None:
            base = {**self._base, **plan.base}
            with torch.no_grad():
                # In place: the addresses the UNet's kernels (and captured graphs) read stay the same.
                for layer, weight in plan.merged.items():
                    self._modules[layer].weight.copy_(weight)
                for layer in [name for name in base if name not in plan.merged]:
                    self._modules[layer].weight.copy_(base.pop(layer))  # no LoRA touches it any more
            self._base = base  # replaced whole: a plan on another thread reads a consistent one
            self.merges += 1
        self._slots = plan.slots
        self.version += 1

    def edit(self, index: int, fields: Mapping[str, Any], *, loaded: LoraWeights | None = None) -> None:
        """Plan and commit at once (on the calling thread)."""
        self.commit(self.plan(index, fields, loaded=loaded))

    def replan(self, plan: LoraPlan) -> LoraPlan:
        """Plan a stale plan's edit again on the stack as it is, reusing the file it read."""
        index, fields = plan.edit
        slot = plan.slots.get(index)
        return self.plan(index, fields, loaded=slot.weights if slot is not None else None)

    def close(self) -> None:
        """Give the UNet back as loaded: hooks removed, merged weights restored. Safe twice."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for layer, weight in self._base.items():
                self._modules[layer].weight.copy_(weight)
        self._base = {}
        self._slots = {}
        self.version += 1

    # -- runtime

    def _concatenate(self, slots: Mapping[int, _Slot]) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
        per_layer: dict[str, list[tuple[int, Factors]]] = {}
        for i, slot in sorted(slots.items()):
            if slot.weights is not None:
                for layer, f in slot.weights.factors.items():
                    per_layer.setdefault(layer, []).append((i, f))
        out = {}
        for layer, items in per_layer.items():
            down = torch.cat([f.down for _, f in items])
            up = torch.cat([f.up for _, f in items], dim=1)
            out[layer] = (down, up, [i for i, f in items for _ in range(f.rank)])
        return out

    def _install(self, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, list[int]]]) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        owners = [i for _, _, owner in layers.values() for i in owner]
        self._scales = torch.zeros(len(owners), device=self.device, dtype=self.dtype)
        self._owner = torch.tensor(owners, dtype=torch.long, device=self.device)
        offset = 0
        for layer, (down, up, owner) in layers.items():
            module = self._modules[layer]
            scales = self._scales[offset : offset + len(owner)]  # a view: later weight changes reach it
            offset += len(owner)
            self._hooks[layer] = module.register_forward_hook(_Adapter(module, down, up, scales))

    def _set_scales(self, gains: list[float]) -> None:
        if self._scales is None or self._owner is None or not len(self._scales):
            return
        table = torch.tensor(gains, device=self.device, dtype=self.dtype)
        self._scales.copy_(table[self._owner])

    # -- merged

    def _merge(self, plan: LoraPlan, bases: Mapping[str, torch.Tensor]) -> None:
        """W = W0 + Σ_i g_i·B_i·A_i for every layer a LoRA touches (float32, then the layer's dtype)."""
        per_layer: dict[str, list[tuple[float, Factors]]] = {}
        for slot in plan.slots.values():
            if slot.weights is not None:
                for layer, f in slot.weights.factors.items():
                    per_layer.setdefault(layer, []).append((slot.gain, f))
        plan.merged = {}
        with torch.no_grad():
            for layer, items in per_layer.items():
                weight = self._modules[layer].weight
                base = bases.get(layer)
                if base is None:
                    # Never written yet, so its weight is W0: keep a copy before the first merge.
                    base = plan.base[layer] = weight.detach().clone()
                merged = base.float()
                for gain, f in items:
                    if gain != 0.0:
                        merged = merged + gain * f.delta()
                plan.merged[layer] = merged.to(weight.dtype)


class StalePlan(RuntimeError):
    """A plan computed before another edit was committed: plan it again (`LoraStack.replan`)."""
