"""Regional prompts ("semantic brushes") on the stream batch, after StreamMultiDiffusion.

A brush is (prompt, negative prompt, mask, mask strength, mask blur, prompt strength, enabled)
painted over the global prompt. Each (stage, frame) row of the stream batch is evaluated once
per *layer* (layer 0 the global prompt, then every active brush in cover order, bottom first)
on the very same latent, in the same single UNet call, and the layers' x0 predictions are fused
with per-stage cover weights. The carried state stays one fused x0 per (stage, frame), which the
next call re-noises once with the stage's fixed noise (stream.py), exactly as without brushes:
no independent noises are averaged, so few-step models stay sharp. For brush p and stage k:

    m_p     = mask_strength_p · G_{blur_p / 8}(A(mask_p))         A: area average onto the latent grid
    q_{p,k} = clip((m_p − σ_{k+1}) / (σ_k − σ_{k+1}), 0, 1)       σ_k = b_k = sqrt(1 − ᾱ(τ_k)), σ_T = 0
    W_{p,k} = q_{p,k} · Π_{j above p} (1 − q_{j,k})               later brushes cover earlier ones
    W_{0,k} = Π_j (1 − q_{j,k})                                    what no brush covers: the global prompt
    x0_k    = Σ_p W_{p,k} · x0_{p,k}                               Σ_p W_{p,k} = 1 at every latent cell
    e_p     = e_g + s_p · (e_brush − e_g)                          prompt strength s_p (e_g: global, in force)

The quantized mask q admits a cell to stage k only once the mask value there reaches that
stage's noise level: at the noisy stages only a brush's core is painted, and as the noise
falls its blurred edge grows in, so edges form where the image is already settled. A hard
mask (blur 0, strength 1) gives q = 1 inside and 0 outside at every stage.

A brush costs UNet rows only while it is enabled and its mask has any area (m > 0 somewhere):
the batch has T·F·(active + 1) stream rows. Layers are laid out stage-major, then frame, then
layer: row (k·F + f)·P + p is layer p of frame f at stage k, P = active + 1.

Edits are two-phase like the engine's own parameters: `check()` validates an edit and does its
heavy work (PNG decoding, rasterising, text encoding through the prompt cache) without touching
any state; `commit()` applies it. Only the edited brush is recomputed; the cover weights of all
layers are then rebuilt from the cached latent masks (a few (T, h, w) products).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from streamnode.live_params import MASK_SOURCES, BrushParams, BrushState, validated

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 32 * 1024 * 1024
MAX_MASK_SIDE = 4096
"""Largest mask (PNG or array) side in pixels: a mask larger than a 4K frame only costs decoding time."""
_FLOAT_MASK_SLACK = 1e-3
"""Float masks are in [0, 1]; this much rounding outside is tolerated (and clipped)."""

_SCALARS = ("prompt", "negative_prompt", "mask_strength", "mask_blur", "prompt_strength", "enabled")
FIELDS = (*_SCALARS, "mask", "rect", "circle", "order", "clear")
"""Fields a brush edit may carry: the `BrushParams` fields the engine reads (live_params.py), plus
`order` (cover position, 0 = bottom) and `clear` (remove the brush). `BrushParams.shm` is the
node's business: it reads the channel and hands the engine mask arrays."""


class MaskError(ValueError):
    """A mask that cannot be used: the message names the file or value and what is allowed."""


@dataclass
class _Slot:
    """One brush: its settings and everything derived from them."""

    brush: BrushState
    coverage: np.ndarray | None  # (h, w) float32: the mask area-averaged onto the latent grid; None: no mask
    soft: torch.Tensor | None  # (h, w): mask_strength · blur(coverage), on the device, float32
    positive: torch.Tensor  # (1, 77, D) own prompt embedding
    negative: torch.Tensor | None  # (1, 77, D); None: the global negative prompt
    stages: torch.Tensor | None = None  # (T, h, w) quantized masks, set at commit

    @property
    def paints(self) -> bool:
        return self.brush.params.enabled and self.soft is not None and bool((self.soft > 0).any())


@dataclass(frozen=True)
class BrushEdit:
    """A validated edit of one brush, ready to commit. `slot` None removes the brush."""

    index: int
    slot: _Slot | None
    position: int | None = None  # new cover position; None: unchanged (new brushes go on top)


# -- masks: sources → latent coverage ---------------------------------------------------------


def rect_mask(x: float, y: float, w: float, h: float, width: int, height: int) -> np.ndarray:
    """(height, width) float32 coverage of the rectangle with top-left (x, y), size (w, h), normalised.

    Exact per-pixel area coverage (anti-aliased edges): column j is covered by
    clip(min(j + 1, x1) − max(j, x0), 0, 1) with x0 = x·width, x1 = (x + w)·width, rows alike.
    """

    def span(start: float, length: float, n: int) -> np.ndarray:
        lo, hi = start * n, (start + length) * n
        edges = np.arange(n, dtype=np.float64)
        return np.clip(np.minimum(edges + 1.0, hi) - np.maximum(edges, lo), 0.0, 1.0)

    return np.outer(span(y, h, height), span(x, w, width)).astype(np.float32)


def circle_mask(x: float, y: float, r: float, width: int, height: int) -> np.ndarray:
    """(height, width) float32 coverage of the disc at (x, y) normalised, radius r·min(width, height).

    The radius is a fraction of the shorter side so the disc stays round on any frame. Edge
    pixels get clip(radius − d + ½, 0, 1), d the distance of the pixel centre: a one-pixel ramp.
    """
    radius = r * min(width, height)
    if radius <= 0.0:
        return np.zeros((height, width), np.float32)
    dy = np.arange(height, dtype=np.float32) + 0.5 - y * height
    dx = np.arange(width, dtype=np.float32) + 0.5 - x * width
    distance = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)
    return np.clip(radius - distance + 0.5, 0.0, 1.0).astype(np.float32)


def load_mask_png(path: str | Path) -> np.ndarray:
    """A PNG file → (H, W) float32 in [0, 1], at the file's own size.

    Checked before decoding: the path is local (no URL, no network share), exists and is a
    regular file, ends in .png, is at most MAX_PNG_BYTES, starts with the PNG signature, and
    its header declares at most MAX_MASK_SIDE pixels a side (so a small file cannot decompress
    into gigabytes).
    Values: the alpha channel when the image has one that is not fully opaque (paint on a
    transparent layer), else the grey level (white = inside); 8- and 16-bit.
    """
    text = str(path)
    if "://" in text or text.startswith(("\\\\", "//")):
        # Reading a network share or URL from the engine thread could stall the show.
        raise MaskError(f"mask {text!r}: masks are local files, not URLs or network shares")
    p = Path(path)
    if not p.exists():
        raise MaskError(f"mask {str(path)!r}: no such file")
    if not p.is_file():
        raise MaskError(f"mask {str(path)!r} is not a file")
    if p.suffix.lower() != ".png":
        raise MaskError(f"mask {str(path)!r}: masks are .png files")
    size = p.stat().st_size
    if size > MAX_PNG_BYTES:
        raise MaskError(f"mask {str(path)!r} is {size / 2**20:.1f} MiB; the limit is {MAX_PNG_BYTES // 2**20} MiB")
    data = p.read_bytes()
    # Signature, then the IHDR chunk: length, b"IHDR", width and height (big-endian uint32).
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise MaskError(f"mask {str(path)!r} is not a PNG file (wrong signature)")
    w, h = struct.unpack(">II", data[16:24])
    if not (1 <= w <= MAX_MASK_SIDE and 1 <= h <= MAX_MASK_SIDE):
        raise MaskError(f"mask {str(path)!r} is {w}×{h}; masks are at most {MAX_MASK_SIDE} pixels a side")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise MaskError(f"mask {str(path)!r}: the PNG data cannot be decoded")
    if image.dtype not in (np.uint8, np.uint16):
        raise MaskError(f"mask {str(path)!r}: {image.dtype} PNGs are not supported; save 8- or 16-bit")
    top = float(np.iinfo(image.dtype).max)
    if image.ndim == 3 and image.shape[2] in (2, 4) and int(image[..., -1].min()) < top:
        values = image[..., -1]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        values = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3:
        values = image[..., 0]
    else:
        values = image
    return values.astype(np.float32) / top


def mask_from_array(mask: Any) -> np.ndarray:
    """A mask array (numpy or torch, (H, W) or (H, W, 1)) → (H, W) float32 in [0, 1].

    bool, uint8 (0..255) and uint16 (0..65535) are scaled; floats must be finite and in [0, 1].
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise MaskError(f"mask: give a PNG path or an H×W array, not {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or not (1 <= mask.shape[0] <= MAX_MASK_SIDE and 1 <= mask.shape[1] <= MAX_MASK_SIDE):
        raise MaskError(f"mask array of shape {mask.shape}: give H×W, at most {MAX_MASK_SIDE} a side")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if mask.dtype in (np.uint8, np.uint16):
        return mask.astype(np.float32) / float(np.iinfo(mask.dtype).max)
    if not np.issubdtype(mask.dtype, np.floating):
        raise MaskError(f"mask array dtype {mask.dtype}: give float in [0, 1], uint8, uint16 or bool")
    values = mask.astype(np.float32)
    lo, hi = (float(values.min()), float(values.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_FLOAT_MASK_SLACK or hi > 1.0 + _FLOAT_MASK_SLACK:
        raise MaskError(f"float masks are in [0, 1]; this one spans [{lo:.4g}, {hi:.4g}]")
    return np.clip(values, 0.0, 1.0)


def latent_coverage(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) mask stretched over the frame → (h, w) coverage of each latent cell.

    Shrinking averages the pixels each cell covers (an 8×8 block for a frame-sized mask);
    enlarging a small mask interpolates.
    """
    h, w = latent_hw
    shrink = mask.shape[0] >= h and mask.shape[1] >= w
    out = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def soften(coverage: np.ndarray, strength: float, blur_px: float, scale: int) -> np.ndarray:
    """m = strength · G(coverage): a Gaussian of std blur_px/scale latent cells (blur_px pixels).

    Blurring the cell coverage is blurring the pixel mask and then averaging it per cell
    (both are convolutions), up to sub-cell detail the latent cannot hold anyway. Borders
    repeat the edge value, so a brush that touches the frame edge stays solid up to it.
    """
    sigma = blur_px / scale
    blurred = coverage
    if sigma >= 0.05:
        blurred = cv2.GaussianBlur(coverage, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return np.clip(blurred * strength, 0.0, 1.0).astype(np.float32)


def quantize(soft: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """(h, w) mask → (T, h, w): q_k = clip((m − σ_{k+1}) / (σ_k − σ_{k+1}), 0, 1), σ_T = 0.

    σ_k is stage k's noise level; the levels fall with k, so each stage admits a wider part of
    a blurred mask than the one before. (Equal neighbouring levels: a plain threshold m ≥ σ_k.)
    """
    levels = [float(s) for s in sigmas] + [0.0]
    stages = []
    for k in range(len(sigmas)):
        hi, lo = levels[k], levels[k + 1]
        if hi > lo:
            stages.append(((soft - lo) / (hi - lo)).clamp(0.0, 1.0))
        else:
            stages.append((soft >= hi).to(soft.dtype))
    return torch.stack(stages)


def cover_weights(stage_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Quantized masks (each (T, h, w)) in cover order, bottom first → (1 + n, T, h, w) weights.

    Top down, each brush takes its mask's share of what the brushes above left uncovered:
    W_p = q_p · Π_{j above p} (1 − q_j); layer 0 (the global prompt) takes the rest,
    Π_j (1 − q_j). The weights sum to 1 at every cell.
    """
    uncovered = torch.ones_like(stage_masks[0])
    weights: list[torch.Tensor] = []
    for q in reversed(stage_masks):
        weights.append(q * uncovered)
        uncovered = uncovered * (1.0 - q)
    weights.append(uncovered)
    return torch.stack(weights[::-1])


def _validate_scalars(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate brush fields against the schema (`BrushParams`), so presets, OSC and the engine agree."""
    checked = validated(BrushParams, fields)
    return {key: getattr(checked, key) for key in fields}


# -- the brush set -----------------------------------------------------------------------


class Regions:
    """The brushes of one engine: settings, latent masks, encodings and per-stage cover weights.

    `encode(texts)` returns one (1, 77, D) embedding per text (the engine's prompt cache, so a
    known prompt costs no text-encoder pass). `set_sigmas()` gives the stage noise levels
    σ_0 … σ_{T−1} (again after every schedule change). Not thread-safe: the engine thread only.
    """

    def __init__(
        self,
        *,
        width: int,
        height: int,
        latent_hw: tuple[int, int],
        max_brushes: int,
        encode: Callable[[list[str]], list[torch.Tensor]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if not 0 <= max_brushes <= 32:
            raise ValueError(f"max_brushes = {max_brushes}: must be in 0..32")
        self.width, self.height = width, height
        self.latent_hw = latent_hw
        self.scale = width // latent_hw[1]
        self.max_brushes = max_brushes
        self._encode = encode
        self.device, self.dtype = device, dtype
        self._slots: dict[int, _Slot] = {}
        self._order: list[int] = []  # cover order, bottom first
        self._sigmas: tuple[float, ...] = ()
        self._active: tuple[int, ...] = ()
        self._weights: torch.Tensor | None = None  # (P, T, 1, 1, h, w), engine dtype

    # -- read-only views ---------------------------------------------------------------

    @property
    def layers(self) -> int:
        """P: UNet rows per (stage, frame): the global prompt plus every active brush."""
        return 1 + len(self._active)

    @property
    def active(self) -> tuple[int, ...]:
        """Brushes that cost rows (enabled, with a mask of any area), in cover order, bottom first."""
        return self._active

    @property
    def order(self) -> tuple[int, ...]:
        """Every brush, in cover order (bottom first): later ones cover earlier ones."""
        return tuple(self._order)

    @property
    def brushes(self) -> dict[int, BrushState]:
        """Every brush in force, in cover order (bottom first)."""
        return {i: self._slots[i].brush for i in self._order}

    def mask(self, index: int) -> torch.Tensor | None:
        """Brush `index`'s latent mask m = strength · blur(coverage), (h, w), a copy; None: no mask."""
        soft = self._slot(index).soft
        return None if soft is None else soft.clone()

    def stage_masks(self, index: int) -> torch.Tensor | None:
        """Brush `index`'s quantized masks q_k, (T, h, w), a copy; None: no mask."""
        stages = self._slot(index).stages
        return None if stages is None else stages.clone()

    @property
    def weights(self) -> torch.Tensor | None:
        """Cover weights W, (P, T, h, w) (layer 0 the global prompt), a copy; None without active brushes."""
        return None if self._weights is None else self._weights[:, :, 0, 0].clone()

    def _slot(self, index: int) -> _Slot:
        if index not in self._slots:
            raise KeyError(f"no brush {index}; brushes: {sorted(self._slots) or 'none'}")
        return self._slots[index]

    # -- edits -------------------------------------------------------------------------

    def check(self, index: Any, fields: Mapping[str, Any]) -> BrushEdit:
        """Validate an edit of brush `index` and prepare what it needs; change nothing.

        fields: any of FIELDS. Setting a field of a brush that does not exist creates it (on top
        of the cover order). mask: a PNG path, an H×W array (numpy or torch), or None (no mask);
        rect: (x, y, w, h); circle: (x, y, r), normalised. Raises ValueError (MaskError for
        masks) naming the field and what is allowed.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"brush {index!r}: the brush number is an integer")
        index = int(index)
        if not 0 <= index < self.max_brushes:
            raise ValueError(f"brush {index}: use 0..{self.max_brushes - 1} (runtime.max_brushes = {self.max_brushes})")
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            hint = " (shm:// masks are read by the node, which passes the engine mask arrays)" if "shm" in unknown else ""
            raise ValueError(f"unknown brush field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}{hint}")
        if not fields:
            raise ValueError(f"brush {index}: the edit changes nothing")
        if "clear" in fields:
            if len(fields) > 1:
                raise ValueError("clear removes the brush: send it alone")
            if index not in self._slots:
                raise ValueError(f"brush {index} does not exist; brushes: {sorted(self._slots) or 'none'}")
            return BrushEdit(index, None)
        sources = [k for k in ("mask", "rect", "circle") if k in fields]
        if len(sources) > 1:
            raise ValueError(f"give one mask source per edit, not {' and '.join(sources)}")

        old = self._slots.get(index)
        brush = old.brush if old is not None else BrushState()
        changes = _validate_scalars({k: fields[k] for k in _SCALARS if k in fields})
        array = brush.mask_array
        position = None
        if "order" in fields:
            count = len(self._order) + (old is None)
            value = fields["order"]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < count:
                raise ValueError(f"order = {value!r}: the cover position is an integer in 0..{count - 1} (0 = bottom)")
            position = int(value)

        # 1. The mask source → latent coverage (only when a source is given).
        coverage = old.coverage if old is not None else None
        if sources:
            coverage, source, array = self._coverage(sources[0], fields[sources[0]])
            changes.update(dict.fromkeys(MASK_SOURCES), **source)
        new_params = brush.params.model_copy(update=changes)
        new = BrushState(new_params, array)

        # 2. Latent mask m: only when the coverage, strength or blur changed.
        soft = old.soft if old is not None else None
        was = brush.params
        if sources or old is None or (new_params.mask_strength, new_params.mask_blur) != (was.mask_strength, was.mask_blur):
            soft = None
            if coverage is not None:
                m = soften(coverage, new_params.mask_strength, new_params.mask_blur, self.scale)
                soft = torch.from_numpy(m).to(self.device)

        # 3. Encodings: only texts that changed (the prompt cache serves texts it has seen).
        texts = []
        if old is None or new_params.prompt != was.prompt:
            texts.append(new_params.prompt)
        if (old is None or new_params.negative_prompt != was.negative_prompt) and new_params.negative_prompt:
            texts.append(new_params.negative_prompt)
        encoded = dict(zip(texts, self._encode(texts), strict=True)) if texts else {}
        previous = old.positive if old is not None else None
        positive = encoded.get(new_params.prompt, previous)
        assert positive is not None
        negative = None
        if new_params.negative_prompt:
            negative = encoded.get(new_params.negative_prompt, old.negative if old is not None else None)

        slot = _Slot(new, coverage, soft, positive.to(self.device, self.dtype),
                     None if negative is None else negative.to(self.device, self.dtype))
        return BrushEdit(index, slot, position)

    def _coverage(self, source: str, value: Any) -> tuple[np.ndarray | None, dict[str, Any], np.ndarray | None]:
        """A mask source → (latent coverage, the BrushParams fields that record it, the array kept
        for an array mask)."""
        W, H = self.width, self.height
        if value is None:
            return None, {}, None
        if source == "mask":
            if isinstance(value, (str, Path)):
                path = _validate_scalars({"mask": str(value)})["mask"]
                return latent_coverage(load_mask_png(value), self.latent_hw), {"mask": path}, None
            array = mask_from_array(value)
            array.flags.writeable = False  # reported in snapshots: nobody may edit it in place
            return latent_coverage(array, self.latent_hw), {}, array
        shape = tuple(float(v) for v in _validate_scalars({source: value})[source])
        raster = rect_mask(*shape, W, H) if source == "rect" else circle_mask(*shape, W, H)
        return latent_coverage(raster, self.latent_hw), {source: shape}, None

    def commit(self, edit: BrushEdit) -> bool:
        """Apply a checked edit. Returns True when the number of layers (UNet rows) changed."""
        before = self.layers
        i = edit.index
        if edit.slot is None:
            del self._slots[i]
            self._order.remove(i)
            logger.debug("brush %d removed", i)
        else:
            slot = edit.slot
            if slot.soft is not None and self._sigmas:
                slot.stages = quantize(slot.soft, self._sigmas)
            if i not in self._slots:
                self._order.append(i)
            self._slots[i] = slot
            if edit.position is not None:
                self._order.remove(i)
                self._order.insert(edit.position, i)
            logger.debug("brush %d: %s", i, slot.brush)
        self._rebuild()
        return self.layers != before

    def check_order(self, order: Any) -> tuple[int, ...]:
        """A new cover order (bottom first): a permutation of the existing brush numbers."""
        if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
            raise ValueError("brush_order: give the brush numbers bottom first, e.g. [2, 0, 1]")
        values = tuple(order)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values) or sorted(
            int(v) for v in values
        ) != sorted(self._slots):
            raise ValueError(
                f"brush_order {list(values)}: give every brush number once, bottom first; brushes: {sorted(self._slots)}"
            )
        return tuple(int(v) for v in values)

    def commit_order(self, order: tuple[int, ...]) -> None:
        self._order = list(order)
        self._rebuild()

    def set_sigmas(self, sigmas: Sequence[float]) -> None:
        """Stage noise levels σ_k = sqrt(1 − ᾱ(τ_k)), noisiest first: every brush re-quantized."""
        self._sigmas = tuple(float(s) for s in sigmas)
        for slot in self._slots.values():
            slot.stages = None if slot.soft is None else quantize(slot.soft, self._sigmas)
        self._rebuild()

    def _rebuild(self) -> None:
        """Active brushes and the cover weights, from the cached quantized masks."""
        active = tuple(i for i in self._order if self._slots[i].paints)
        # The weights are published before the brushes they cover: a reader on another thread
        # (status, tests) that sees the new `active` also sees weights with a layer for each.
        if not active or not self._sigmas:
            self._weights = None
        else:
            weights = cover_weights([self._slots[i].stages for i in active])  # type: ignore[misc]
            P, T, h, w = weights.shape
            self._weights = weights.view(P, T, 1, 1, h, w).to(self.device, self.dtype)
        self._active = active

    # -- per frame ---------------------------------------------------------------------

    def layer_embeddings(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global [negative, positive] (2, 77, D) → per-layer (negative, positive), each (P, 77, D).

        Layer p > 0 mixes toward the global prompt in force: e_p = e_g + s_p·(e_brush − e_g);
        its negative likewise, or the global negative when the brush has none.
        """
        negative_g, positive_g = emb[0:1], emb[1:2]
        negatives, positives = [negative_g], [positive_g]
        for i in self._active:
            slot = self._slots[i]
            s = slot.brush.params.prompt_strength
            positives.append(torch.lerp(positive_g, slot.positive, s))
            negatives.append(negative_g if slot.negative is None else torch.lerp(negative_g, slot.negative, s))
        return torch.cat(negatives), torch.cat(positives)

    def fuse(self, layers: torch.Tensor, frames: int, stages: slice = slice(None)) -> torch.Tensor:
        """Per-layer predictions (P, rows, C, h, w), rows stage-major then frame → (rows, C, h, w).

        x = Σ_p W_{p,k}·x_p with the cover weights of each row's stage k (`stages` selects the
        stages the rows hold; all of them in the stream batch).
        """
        assert self._weights is not None
        P, rows = layers.shape[:2]
        per_stage = layers.unflatten(1, (-1, frames))  # (P, T, F, C, h, w)
        return (per_stage * self._weights[:, stages]).sum(0).view(rows, *layers.shape[2:])
