"""ControlNets on the stream batch: load, check against the base model, residuals for every row.

Up to `max_controlnets` diffusers `ControlNetModel`s, each with its live `ControlNetParams`
(live_params.py). In one engine call every usable net runs once over all the UNet rows (the
stream rows and the negative rows, every brush layer), on the rows' own latents, timesteps,
prompt embeddings and **maps**; its down and mid residuals are weighted per row,

    w_row = scale · [start ≤ k/T and (k+1)/T ≤ end]        k the row's stage, T the stages

summed over the nets and handed to the ONE UNet call through the seam's keyword-only
`control=(down_residuals, mid_residual)` (diffusers' `down_block_additional_residuals`,
`mid_block_additional_residual`). A net with scale 0, disabled, without a model, without a
stage in its range or without a map yet is not evaluated at all: with none usable the UNet is
called exactly as without ControlNets.

Each frame keeps its own map as it moves through the stages: stage k of this call uses the map
of the frame that was at stage k − 1 last call (`StageMaps`), so the stream equals the
step-by-step reference, as without ControlNets.

Weights are read from safetensors only (a folder with config.json, a .safetensors file beside
its config.json or in the original single-file layout, or a hub id), loaded by `plan()` off the
engine thread, and checked against the base UNet (cross-attention width, block channels, layers,
extra conditioning) so a net made for another model is refused with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamnode.diffusion.control_maps import is_builtin, make_map
from streamnode.live_params import ControlNetParams, validated

logger = logging.getLogger(__name__)

Control = tuple[tuple[torch.Tensor, ...], torch.Tensor]
"""What the UNet seam's `control` carries: (down block residuals, mid block residual), per row."""

_CHECKED_FIELDS = (
    ("cross_attention_dim", "cross-attention width"),
    ("block_out_channels", "block channels"),
    ("layers_per_block", "layers per block"),
    ("in_channels", "latent channels"),
    ("addition_embed_type", "extra conditioning"),
)


class ControlNetError(ValueError):
    """A ControlNet that cannot be used; the message is one line naming the cause."""


def incompatibility(net_config: Any, unet_config: Any) -> str | None:
    """Why a ControlNet's residuals would not fit this UNet, or None when they do."""
    for name, what in _CHECKED_FIELDS:
        mine, theirs = getattr(net_config, name, None), getattr(unet_config, name, None)
        if isinstance(mine, list | tuple) and isinstance(theirs, list | tuple):
            mine, theirs = tuple(mine), tuple(theirs)
        if mine != theirs:
            return f"made for another base model: its {what} is {mine}, this model's is {theirs}"
    if len(net_config.down_block_types) != len(unet_config.down_block_types):
        return "made for another base model: a different number of down blocks"
    return None


def load_controlnet(source: str, components: Any) -> torch.nn.Module:
    """Load a ControlNet (folder, .safetensors, hub id, or `tiny`) for `components`' UNet, on
    their device and dtype, in eval mode. Raises ControlNetError with one line."""
    from diffusers import ControlNetModel

    if not source:
        raise ControlNetError("no model given")
    if source.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
        raise ControlNetError("ControlNet weights are read from .safetensors only (pickle files can run code)")
    dtype = components.dtype
    try:
        if source == "tiny":
            from streamnode.diffusion.tiny_controlnet import ensure_tiny_controlnet

            net = ControlNetModel.from_pretrained(ensure_tiny_controlnet(), use_safetensors=True, torch_dtype=dtype)
        elif (path := Path(source).expanduser()).is_file():
            net = _from_file(path)
        elif path.is_dir():
            net = ControlNetModel.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
        elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
            net = ControlNetModel.from_pretrained(source, use_safetensors=True, torch_dtype=dtype)
        else:
            raise ControlNetError(f"{source}: no such file or folder")
    except ControlNetError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is one line to the user
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ControlNetError(f"{source}: cannot load it ({first})") from None
    why = incompatibility(net.config, components.unet.config)
    if why is not None:
        raise ControlNetError(f"{source}: {why}")
    if net.dtype != dtype:
        net = net.to(dtype=dtype)
    return net.to(components.device).eval().requires_grad_(False)


def _from_file(path: Path) -> torch.nn.Module:
    from diffusers import ControlNetModel

    if path.suffix.lower() != ".safetensors":
        raise ControlNetError(f"{path}: ControlNet weights are read from .safetensors only")
    if (path.parent / "config.json").is_file():
        from safetensors.torch import load_file

        net = ControlNetModel.from_config(ControlNetModel.load_config(path.parent))
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ControlNetError(
                f"{path}: the weights do not fit its config.json ({len(missing)} missing, {len(unexpected)} unexpected)"
            )
        return net
    # The original single-file layout: diffusers reads the architecture from the weights.
    return ControlNetModel.from_single_file(str(path))


@dataclass
class ControlPlan:
    """An edit of ControlNet `index`, with its heavy half done (the weights loaded); `params`
    None removes it. Made by `ControlStack.plan()` on any thread, committed on the engine thread."""

    index: int
    params: ControlNetParams | None
    net: torch.nn.Module | None = None
    """The loaded model when the edit brings a new one; None keeps the slot's."""


@dataclass(eq=False)
class _Slot:
    params: ControlNetParams
    net: torch.nn.Module | None = None
    held: torch.Tensor | None = None
    """The last map given from outside (`set_map`), (1 or F, 3, H, W) in [0, 1]; held until the next."""
    new: torch.Tensor | None = None
    """The map of the frames entering this call, (F, 3, H, W)."""
    stages: list[torch.Tensor] = field(default_factory=list)
    """The map of the frames at each stage after the last call (stage-major, F each)."""
    rows: torch.Tensor | None = None
    """Preallocated (batch_rows, 3, H, W): the map of every UNet row of a stream call."""
    cached: Control | None = None
    age: int = 0


class ControlStack:
    """The engine's ControlNets by index (0..max_nets−1), their maps, and their residuals.

    Not thread-safe except `plan()`, which changes nothing; the engine thread does the rest.
    """

    def __init__(self, components: Any, *, width: int, height: int, max_nets: int = 4) -> None:
        self._components = components
        self._device: torch.device = components.device
        self._dtype: torch.dtype = components.dtype
        self.width, self.height = width, height
        self.max_nets = max_nets
        self._slots: dict[int, _Slot] = {}
        self.stats: dict[str, int] = {"controlnet_calls": 0, "controlnet_reused": 0}

    # -- edits -----------------------------------------------------------------------------

    @property
    def params(self) -> dict[int, ControlNetParams]:
        return {i: s.params for i, s in sorted(self._slots.items())}

    def _merged(self, index: Any, fields: Mapping[str, Any]) -> ControlNetParams | None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.max_nets:
            raise ValueError(f"controlnet index {index!r}: use 0..{self.max_nets - 1} (runtime.max_controlnets)")
        if "clear" in fields:
            if len(fields) > 1:
                raise ValueError("controlnet clear: give it alone")
            return None
        slot = self._slots.get(index)
        base = slot.params.model_dump() if slot is not None else {}
        return validated(ControlNetParams, {**base, **fields})

    def heavy(self, index: Any, fields: Mapping[str, Any]) -> bool:
        """True when the edit brings a model to load (done off the engine thread by the node)."""
        slot = self._slots.get(index) if isinstance(index, int) else None
        model = fields.get("model")
        return bool(model) and (slot is None or slot.net is None or model != slot.params.model)

    def plan(self, index: Any, fields: Mapping[str, Any]) -> ControlPlan:
        """Validate an edit and load what it needs (a new model). Changes nothing; any thread.
        Raises ValueError (ControlNetError for a model that cannot be used) with one line."""
        params = self._merged(index, fields)
        net = None
        if params is not None and params.model and self.heavy(index, fields):
            net = load_controlnet(params.model, self._components)
        return ControlPlan(index, params, net)

    def commit(self, plan: ControlPlan) -> None:
        """Apply a plan (engine thread). A model changed since the plan was made is loaded here."""
        if plan.params is None:
            self._slots.pop(plan.index, None)
            return
        slot = self._slots.get(plan.index)
        net = plan.net if plan.net is not None else (slot.net if slot is not None else None)
        if not plan.params.model:
            net = None
        elif net is None or (plan.net is None and slot is not None and plan.params.model != slot.params.model):
            net = load_controlnet(plan.params.model, self._components)  # before anything changes: it may fail
        if slot is None:
            slot = self._slots[plan.index] = _Slot(plan.params)
        if plan.params.map != slot.params.map:
            slot.held = None  # a new map source: its own maps only
        slot.params, slot.net, slot.cached = plan.params, net, None

    def set_map(self, index: int, image: Any) -> None:
        """The map for ControlNet `index` from outside (an external source, or a preprocessor run
        off the engine thread): used for the frames of the next calls until another arrives.

        image: float (3, H, W) / (F, 3, H, W) in [0, 1], or uint8 (H, W, 3) / (F, H, W, 3) / (H, W)
        numpy, at the engine's size. Raises ValueError for another size or layout (fit it first)."""
        slot = self._slots.get(index)
        if slot is None:
            raise ValueError(f"controlnet {index} does not exist: give it a model first")
        slot.held = self._as_map(image)

    def _as_map(self, image: Any) -> torch.Tensor:
        H, W = self.height, self.width
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ValueError(f"a numpy map is uint8, not {image.dtype}")
            array = image[:, :, None] if image.ndim == 2 else image
            array = array if array.ndim == 4 else array[None]
            if array.ndim != 4 or array.shape[1:3] != (H, W) or array.shape[3] not in (1, 3, 4):
                raise ValueError(f"map shape {image.shape}: expected ({H}, {W}, 3) or ({H}, {W}) (fit it first)")
            tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(0, 3, 1, 2).float() / 255.0
            tensor = tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor
        elif isinstance(image, torch.Tensor):
            tensor = image.float()
            if tensor.ndim == 2:
                tensor = tensor.expand(3, -1, -1)
        else:
            raise ValueError(f"a map is a numpy array or a tensor, not {type(image).__name__}")
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] != 3 or tuple(tensor.shape[2:]) != (H, W):
            raise ValueError(f"map shape {tuple(image.shape)}: expected (3, {H}, {W}) or (F, 3, {H}, {W})")
        return tensor.to(self._device, self._dtype).contiguous()

    # -- per call --------------------------------------------------------------------------

    def _usable(self, slot: _Slot) -> bool:
        p = slot.params
        return slot.net is not None and p.enabled and p.scale > 0.0 and p.start < p.end

    @staticmethod
    def stage_weights(params: ControlNetParams, steps: int) -> list[float]:
        """scale for the stages in [start, end] (diffusers' guidance_start/end rule), else 0."""
        return [
            params.scale if params.start <= k / steps and (k + 1) / steps <= params.end else 0.0
            for k in range(steps)
        ]

    def begin(self, image: torch.Tensor | None, frames: int) -> None:
        """The maps of the frames entering this call: a map given from outside, else the built-in
        preprocessor of `image` ((F, 3, H, W) in [-1, 1]; None for txt2img: no built-in map)."""
        for slot in self._slots.values():
            slot.new = None
            if not self._usable(slot):
                continue
            p = slot.params
            if slot.held is not None:
                slot.new = slot.held if slot.held.shape[0] == frames else slot.held[-1:].expand(frames, -1, -1, -1)
            elif image is not None and is_builtin(p.map):
                slot.new = make_map(p.map, image, canny_low=p.canny_low, canny_high=p.canny_high)

    def active(self, steps: int) -> bool:
        """Whether any net adds residuals this call (a usable net with a map and a stage in range)."""
        return any(self._live(slot, steps) for slot in self._slots.values())

    def _live(self, slot: _Slot, steps: int) -> bool:
        return self._usable(slot) and slot.new is not None and any(self.stage_weights(slot.params, steps))

    def stream_maps(self, steps: int, frames: int, layers: int, negative_rows: int) -> None:
        """Write each live net's map of every UNet row of a stream call (stage-major, frame,
        layer; the negative rows repeat the first stream rows): stage 0 holds the new frames'
        map, stage k the map of last call's stage k − 1."""
        rows = steps * frames * layers + negative_rows
        for slot in self._slots.values():
            if not self._live(slot, steps):
                continue
            assert slot.new is not None
            if slot.rows is None or slot.rows.shape[0] != rows:
                slot.rows = torch.empty((rows, 3, self.height, self.width), device=self._device, dtype=self._dtype)
            stream = slot.rows[negative_rows:].view(steps, frames, layers, 3, self.height, self.width)
            for k, stage_map in enumerate(self._stages_now(slot, steps)):
                stream[k].copy_(stage_map.unsqueeze(1).expand(frames, layers, -1, -1, -1))
            if negative_rows:
                slot.rows[:negative_rows] = slot.rows[negative_rows : 2 * negative_rows]

    def frame_row_maps(self, *, layers: int, copies: int) -> dict[int, torch.Tensor]:
        """Each live net's map of the rows of one reference stage: the new frames' map per (frame,
        layer), `copies` times (2: negative rows first)."""
        out = {}
        for index, slot in self._slots.items():
            if slot.new is not None:
                rows = slot.new.repeat_interleave(layers, 0) if layers > 1 else slot.new
                out[index] = rows.repeat(copies, 1, 1, 1) if copies > 1 else rows
        return out

    def _stages_now(self, slot: _Slot, steps: int) -> list[torch.Tensor]:
        """Stage k's map this call: the new frames' at stage 0, last call's stage k − 1 after
        (the new map where a stage has none yet: a net just added, or the stream refilled)."""
        assert slot.new is not None
        before = slot.stages
        return [slot.new, *(before[k - 1] if k - 1 < len(before) else slot.new for k in range(1, steps))]

    def advance(self, steps: int) -> None:
        """Commit a stream call: the maps move one stage on with their frames (the stream's x0
        does the same). A net without a map this call forgets its stages."""
        for slot in self._slots.values():
            slot.stages = [] if slot.new is None else self._stages_now(slot, steps)

    def remap_stages(self, index: torch.Tensor | list[int]) -> None:
        """T changed: new stage k continues from old stage index[k] (as the stream's x0)."""
        for slot in self._slots.values():
            if slot.stages:
                slot.stages = [slot.stages[min(i, len(slot.stages) - 1)] for i in index]

    def reset(self) -> None:
        """The stream was emptied: forget the maps carried with the frames and the reused residuals."""
        for slot in self._slots.values():
            slot.stages, slot.cached, slot.age = [], None, 0

    def residuals(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        hidden: torch.Tensor,
        added: Any,
        stage_of_row: torch.Tensor,
        steps: int,
        *,
        maps: Mapping[int, torch.Tensor] | None = None,
        reuse: bool = False,
    ) -> Control | None:
        """Σ over the live nets of their residuals weighted per row, or None when no net is live.

        maps: each net's map of every row (the reference's); default the stream rows written by
        `stream_maps`. reuse: a net with `reuse` N > 1 serves its last residuals for N − 1 calls
        (stream calls only)."""
        parts: list[Control] = []
        for index, slot in sorted(self._slots.items()):
            if not self._live(slot, steps):
                continue
            if reuse and slot.cached is not None and slot.age < slot.params.reuse and slot.cached[1].shape[0] == x.shape[0]:
                slot.age += 1
                self.stats["controlnet_reused"] += 1
                parts.append(slot.cached)
                continue
            cond = maps[index] if maps is not None else slot.rows
            assert cond is not None and slot.net is not None
            weights = torch.tensor(self.stage_weights(slot.params, steps), device=x.device, dtype=x.dtype)
            w = weights[stage_of_row].view(-1, 1, 1, 1)
            down, mid = slot.net(
                x, t, encoder_hidden_states=hidden, controlnet_cond=cond, conditioning_scale=1.0,
                added_cond_kwargs=added, return_dict=False,
            )
            self.stats["controlnet_calls"] += 1
            part: Control = (tuple(d.mul_(w) for d in down), mid.mul_(w))
            if reuse:
                slot.cached, slot.age = part, 1
            parts.append(part)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        down = [d.clone() for d in parts[0][0]]
        mid = parts[0][1].clone()
        for more_down, more_mid in parts[1:]:
            for acc, d in zip(down, more_down, strict=True):
                acc.add_(d)
            mid.add_(more_mid)
        return tuple(down), mid

    def close(self) -> None:
        self._slots.clear()
