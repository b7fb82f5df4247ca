"""The feature bank: self-attention that also sees earlier frames (StreamV2V's idea; docs/temporal.md).

Each self-attention layer (`attn1` of every transformer block) of the UNet keeps, for every row
of the stream batch, the keys, values and outputs of up to M earlier frames at the same stage:

    K' = [K ; K_bank],  V' = [V ; V_bank]                the N new tokens attend to (1 + m)·N tokens
    O  = to_out(softmax(Q·K'ᵀ/√d)·V')
    O ← O + w·(O_near − O),  w = fusion·[cos(O, O_near) ≥ threshold]
                                                         O_near: the banked output most similar to O

so a static scene keeps the texture it had instead of re-imagining it every frame. The bank of
a row holds that row's features from earlier calls: row k·F + f is always stage k, so a stage
is only ever compared with the same noise level. The bank is written every `interval`
processed calls, into a ring of M slots (attention and the nearest match do not depend on the
slots' order).

Off, nothing is installed: the UNet's own processors run (`FeatureBank.install` / `remove`).
Installed but not armed (another engine sharing the UNet, or a call outside the stream), a
processor computes plain attention. `banked_attention` is the math as a pure function of
tensors, shared with the stateless export (accel/onnx_export.py), where the bank goes in and out
of the graph as explicit inputs and outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """The UNet's self-attention modules (`…attn1`), in module order: the banked layers."""
    return [(name, module) for name, module in unet.named_modules() if name.endswith("attn1")]


def banked_attention(
    attn: Any,
    hidden: torch.Tensor,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    bank_out: torch.Tensor | None,
    valid: torch.Tensor | None,
    fusion: float | torch.Tensor,
    threshold: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One self-attention layer with a bank: (output, K, V, O) for hidden (rows, N, C).

    bank_k, bank_v, bank_out: (rows, M·N, C) earlier frames' keys, values and outputs, or None
    (plain attention). valid: (M·N,) bool, the tokens of filled slots (None: all). Returns the
    layer's output (fused) and the new K, V and O (what the bank records; O is fused too, so a
    kept texture stays kept). Diffusers' Attention module supplies the projections.
    """
    rows, tokens, _ = hidden.shape
    heads = attn.heads
    query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    head_dim = key.shape[-1] // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(rows, -1, heads, head_dim).transpose(1, 2)

    mask = None
    if bank_k is None:
        keys, values = key, value
    else:
        keys, values = torch.cat([key, bank_k], dim=1), torch.cat([value, bank_v], dim=1)  # type: ignore[list-item]
        if valid is not None:
            # Empty slots get −inf before the softmax: exactly as if they were not there.
            keep = torch.cat([torch.ones(tokens, dtype=torch.bool, device=valid.device), valid])
            mask = keep.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(split(query), split(keys), split(values), attn_mask=mask)
    out = out.transpose(1, 2).reshape(rows, tokens, heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if bank_out is not None:
        # Fusion: each token moves towards its nearest banked output when they already agree.
        sim = torch.matmul(F.normalize(out, dim=-1), F.normalize(bank_out, dim=-1).transpose(1, 2))
        if valid is not None:
            sim = sim.masked_fill(~valid.view(1, 1, -1), -2.0)
        best, index = sim.max(dim=-1)
        nearest = torch.gather(bank_out, 1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        weight = (best >= threshold).to(out.dtype).unsqueeze(-1) * fusion
        out = out + weight * (nearest - out)
    return out, key, value, out


class _BankedProcessor:
    """attn1's processor while the bank is installed: banked attention when armed, plain otherwise."""

    def __init__(self, bank: FeatureBank, layer: int, original: Any) -> None:
        self.bank, self.layer, self.original = bank, layer, original

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        if not self.bank.armed or encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self.bank.attend(self.layer, attn, hidden_states)


class FeatureBank:
    """The bank of one engine: per attn1 layer, per UNet row, M earlier frames' K, V and outputs.

    Storage is allocated once per (rows, M) and reused: per layer K, V, O as (rows, M·N, C). The
    engine arms it around its own UNet calls (`call`), says which bank rows the call's rows are
    (None: all, the stream call) and whether to record, and commits a recorded call after the
    frame succeeded (`commit`): a failed frame leaves the bank as it was.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = unet
        self._layers = self_attention_layers(unet)
        self._originals: list[Any] | None = None
        self.size = 4
        self.fusion = 0.8
        self.threshold = 0.98
        self.armed = False
        self._rows = 0
        self._select: torch.Tensor | None = None
        self._record = False
        # Per layer: (rows, M·N, C) K, V, O; the call's new K, V, O until commit; filled slots.
        self._k: list[torch.Tensor | None] = [None] * len(self._layers)
        self._v: list[torch.Tensor | None] = [None] * len(self._layers)
        self._o: list[torch.Tensor | None] = [None] * len(self._layers)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self._layers)
        self._valid: list[torch.Tensor | None] = [None] * len(self._layers)
        self.filled = 0
        self._next = 0

    @property
    def installed(self) -> bool:
        return self._originals is not None

    @property
    def layers(self) -> int:
        return len(self._layers)

    def install(self) -> None:
        """Put the banked processors on the UNet's attn1 layers (the originals are kept)."""
        if self._originals is not None:
            return
        self._originals = [module.processor for _, module in self._layers]
        for i, (_, module) in enumerate(self._layers):
            module.set_processor(_BankedProcessor(self, i, self._originals[i]))

    def remove(self) -> None:
        """Give the UNet its own processors back and forget the bank. Safe twice."""
        if self._originals is not None:
            for (_, module), original in zip(self._layers, self._originals, strict=True):
                module.set_processor(original)
            self._originals = None
        self.reset(rows=0)

    def configure(self, *, size: int, fusion: float, threshold: float) -> None:
        """New settings; a new size empties the bank (its storage is sized by it)."""
        if size != self.size:
            self.size = size
            self.reset()
        self.fusion, self.threshold = fusion, threshold

    def reset(self, rows: int | None = None) -> None:
        """Empty the bank (and size it for `rows` UNet rows when given): a new layout or a new stream."""
        if rows is not None and rows != self._rows:
            self._rows = rows
            self._k = [None] * len(self._layers)
            self._v = [None] * len(self._layers)
            self._o = [None] * len(self._layers)
        self._pending = [None] * len(self._layers)
        self._valid = [None] * len(self._layers)
        self.filled = 0
        self._next = 0

    @contextmanager
    def call(self, select: torch.Tensor | None = None, *, record: bool = False) -> Iterator[None]:
        """Arm the processors for one UNet call of this engine.

        select: the bank rows of the call's rows (None: the call is the stream batch, every row);
        record: keep this call's K, V, O for `commit`."""
        self.armed, self._select, self._record = True, select, record
        try:
            yield
        finally:
            self.armed, self._select, self._record = False, None, False

    def attend(self, layer: int, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        """One armed layer: banked attention over the call's rows of the bank."""
        input_ndim = hidden.ndim
        if input_ndim == 4:  # (rows, C, h, w) blocks: attention runs on (rows, h·w, C)
            rows, channels, height, width = hidden.shape
            hidden = hidden.view(rows, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise NotImplementedError("the feature bank supports the plain self-attention of SD UNets")
        residual = hidden
        bank = self._bank_rows(layer, hidden)
        out, key, value, recorded = banked_attention(
            attn, hidden, *bank, valid=self._valid[layer] if bank[0] is not None and self.filled < self.size else None,
            fusion=self.fusion, threshold=self.threshold,
        )
        if self._record:
            self._pending[layer] = (key, value, recorded)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(rows, channels, height, width)
            residual = residual.transpose(-1, -2).reshape(rows, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _bank_rows(
        self, layer: int, hidden: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        k, v, o = self._k[layer], self._v[layer], self._o[layer]
        if self.filled == 0 or k is None or v is None or o is None:
            return None, None, None
        if self._select is None:
            if k.shape[0] != hidden.shape[0]:
                raise ValueError(f"the feature bank holds {k.shape[0]} rows, the UNet call has {hidden.shape[0]}")
            return k, v, o
        return k.index_select(0, self._select), v.index_select(0, self._select), o.index_select(0, self._select)

    def commit(self) -> None:
        """Write the recorded call into the next ring slot (after its frame succeeded)."""
        if self._pending[0] is None:
            return
        slot = self._next
        for layer, pending in enumerate(self._pending):
            assert pending is not None
            key, value, out = pending
            rows, tokens, channels = key.shape
            if self._k[layer] is None:
                shape = (rows, self.size * tokens, channels)
                self._k[layer] = key.new_zeros(shape)
                self._v[layer] = key.new_zeros(shape)
                self._o[layer] = key.new_zeros(shape)
            if self._valid[layer] is None:
                self._valid[layer] = torch.zeros(self.size * tokens, dtype=torch.bool, device=key.device)
            span = slice(slot * tokens, (slot + 1) * tokens)
            self._k[layer][:, span] = key  # type: ignore[index]
            self._v[layer][:, span] = value  # type: ignore[index]
            self._o[layer][:, span] = out  # type: ignore[index]
            self._valid[layer][span] = True  # type: ignore[index]
        self._pending = [None] * len(self._layers)
        self._next = (slot + 1) % self.size
        self.filled = min(self.filled + 1, self.size)

    def discard(self) -> None:
        """Forget a recorded call whose frame failed."""
        self._pending = [None] * len(self._layers)
