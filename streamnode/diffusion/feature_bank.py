"""The feature bank: self-attention that also sees earlier frames (StreamV2V's idea; docs/temporal.md).

Each self-attention layer (`attn1` of every transformer block) of the UNet keeps, for every row
of the stream batch, the keys, values and outputs of up to M earlier frames at the same stage:

    K' = [K ; K_bank],  V' = [V ; V_bank]                the N new tokens attend to (1 + M)·N tokens
    O  = to_out(softmax(Q·K'ᵀ/√d + B)·V')                B: the bank's additive bias (below)
    O ← O + w·(O_near − O),  w = fusion·[cos(O, O_near) ≥ threshold]
                                                         O_near: the banked output most similar to O

so a static scene keeps the texture it had instead of re-imagining it every frame. The bank of
a row holds that row's features from earlier calls: row k·F + f is always stage k, so a stage
is only ever compared with the same noise level. The bank is written every `interval`
processed calls into a ring of M slots (attention and the nearest match do not depend on the
slots' order).

Validity is kept per row, slot and token: a slot not yet written is invalid, and a banked token
is forgotten (made invalid in every slot of its row) where the input moved since it was written
(`FeatureBank.forget`, from the motion map of the row's own frame, motion.py): a real change
is not held back by the old scene's features, while still regions keep theirs. An invalid token
gets −inf in B (it is not attended to) and is never nearest. A forgotten token's place is taken
by the new frame's own token at that position: B gives that token log(1 + f) (f: its forgotten
copies in the row's written slots), which is exactly attending to f more copies of it, as if the
bank had been written with the new frame there (`attention_bias`). Masking alone would leave the
still tokens' banked copies weighing M + 1 times against a moved token's once, and the whole
picture would drift for M·N frames while the bank refills (docs/temporal.md, measured).

Off, nothing is installed: the UNet's own processors run (`FeatureBank.install` / `remove`).
Installed but not armed (another engine sharing the UNet, or a call outside the stream), a
processor computes plain attention.

Stateless engines (an ONNX graph, a TensorRT engine): the bank goes in and out of the UNet as
explicit tensors (`BankIO`, `BankedUNetStep`): per layer K, V, O of the call's rows in, this
call's K, V, O out; the engine keeps the ring and writes the outputs into it, the graph holds no
state. A seam that takes the bank says so with a `banked = True` attribute and receives
`bank=BankIO` (keyword-only).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from streamnode.diffusion.motion import MOTION_HIGH

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(K, V, O) of one layer, each (rows, tokens, channels)."""


@dataclass
class BankIO:
    """The bank as the explicit tensors of one UNet call.

    layers: per banked layer, the bank rows of this call as (K, V, O), each (rows, M·N, C) with
    slot s at tokens s·N … (s+1)·N, or None (an empty bank: plain attention). bias: per layer the
    attention's additive bias (rows, (1 + M)·N), the new tokens first (`attention_bias`; None: 0).
    recorded: filled by the call with its own (K, V, O) per layer."""

    layers: list[Features | None]
    bias: list[torch.Tensor | None]
    fusion: float | torch.Tensor
    threshold: float | torch.Tensor
    recorded: list[Features | None] = field(default_factory=list)


@dataclass(frozen=True)
class BankLayer:
    """One banked self-attention layer: its module name, the module, its level (tokens at latent
    size / 2^level per side) and width."""

    name: str
    module: Any
    level: int
    channels: int

    def tokens(self, latent_hw: tuple[int, int]) -> int:
        h, w = grid(latent_hw, self.level)
        return h * w


def grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """The token grid at `level`: each downsampling is a stride-2 convolution with padding 1, ⌈n/2⌉."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def self_attention_layers(unet: torch.nn.Module) -> list[BankLayer]:
    """The UNet's self-attention modules (`…attn1`) in module order, with their levels."""
    levels = len(unet.config.block_out_channels)
    found = []
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue
        block, _, rest = name.partition(".")
        if block == "down_blocks":
            level = int(rest.split(".")[0])
        elif block == "up_blocks":
            level = levels - 1 - int(rest.split(".")[0])
        else:  # mid_block
            level = levels - 1
        found.append(BankLayer(name, module, level, int(module.to_k.out_features)))
    return found


def banked_attention(
    attn: Any,
    hidden: torch.Tensor,
    bank: Features | None,
    bias: torch.Tensor | None,
    fusion: float | torch.Tensor,
    threshold: float | torch.Tensor,
) -> tuple[torch.Tensor, Features]:
    """One self-attention layer with a bank, on hidden (rows, N, C): (output, this call's (K, V, O)).

    bank: (K, V, O) of earlier frames, each (rows, M·N, C), or None (plain attention). bias:
    (rows, (1 + M)·N), added to the scores of the new then the banked keys; −inf on a banked key
    also keeps it from fusion (`attention_bias`; None: 0). The recorded O is the one before
    fusion: a bank of fused outputs feeds on itself and holds an old scene longer (measured: a
    change took 9 frames instead of 6 to show with the bank written every frame). Diffusers'
    Attention module supplies the projections.
    """
    rows, tokens, _ = hidden.shape
    heads = attn.heads
    query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    head_dim = key.shape[-1] // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(rows, -1, heads, head_dim).transpose(1, 2)

    mask = None
    if bank is None:
        keys, values = key, value
    else:
        keys, values = torch.cat([key, bank[0]], dim=1), torch.cat([value, bank[1]], dim=1)
        if bias is not None:
            mask = bias.view(rows, 1, 1, -1)
    out = F.scaled_dot_product_attention(split(query), split(keys), split(values), attn_mask=mask)
    out = out.transpose(1, 2).reshape(rows, tokens, heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    recorded = out
    if bank is not None:
        # Fusion: each token moves towards its most similar banked output when they already agree.
        banked_out = bank[2]
        sim = torch.matmul(F.normalize(out, dim=-1), F.normalize(banked_out, dim=-1).transpose(1, 2))
        if bias is not None:
            # Invalid banked tokens: below any threshold (≥ 0), never nearest enough.
            sim = sim.masked_fill(bias[:, tokens:].unsqueeze(1) < 0, -2.0)
        best, index = sim.max(dim=-1)
        nearest = torch.gather(banked_out, 1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        weight = (best >= threshold).to(out.dtype).unsqueeze(-1) * fusion
        out = out + weight * (nearest - out)
    return out, (key, value, recorded)


def attention_bias(valid: torch.Tensor, written: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The attention's additive bias of one layer's bank, (rows, (1 + M)·N), from its validity
    (rows, M, N), 1 (or True) where a banked token counts, and the number of slots written (the
    others are all invalid):

        new token j:    log(1 + f_j)   f_j = written − valid slots at j: j stands in for its forgotten copies
        banked token:   log(valid)     0 valid, −inf invalid

    Into `out` when given; with a validity already in out's dtype (the bank's own) it allocates
    nothing (the bank refreshes its bias after every change)."""
    rows, slots, tokens = valid.shape
    if out is None:
        out = torch.empty((rows, (1 + slots) * tokens), device=valid.device)
    valid = valid.to(out.dtype)
    new, banked = out[:, :tokens], out[:, tokens:]
    torch.sum(valid, dim=1, out=new)
    new.neg_().add_(written).log1p_()
    torch.log(valid.view(rows, slots * tokens), out=banked)
    return out


class _BankedProcessor:
    """attn1's processor while a bank is installed: banked attention for the bank that is armed,
    plain attention (the UNet's own processor) otherwise. Engines sharing a UNet share it: each
    bank registers on install and leaves on remove; the last one out restores the original."""

    def __init__(self, layer: int, original: Any) -> None:
        self.layer, self.original = layer, original
        self.banks: list[FeatureBank] = []

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        io = next((bank.io for bank in self.banks if bank.io is not None), None)
        if io is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return _attend(attn, hidden_states, io, self.layer)


def _attend(attn: Any, hidden: torch.Tensor, io: BankIO, layer: int) -> torch.Tensor:
    """diffusers' Attention around `banked_attention`: 4-D blocks, residual, output rescale."""
    if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
        raise NotImplementedError("the feature bank supports the plain self-attention of SD/SDXL UNets")
    input_ndim = hidden.ndim
    if input_ndim == 4:
        rows, channels, height, width = hidden.shape
        hidden = hidden.view(rows, channels, height * width).transpose(1, 2)
    residual = hidden
    out, recorded = banked_attention(attn, hidden, io.layers[layer], io.bias[layer], io.fusion, io.threshold)
    io.recorded[layer] = recorded
    if attn.residual_connection:
        out = out + residual
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(rows, channels, height, width)
    return out / attn.rescale_output_factor


class FeatureBank:
    """The bank of one engine: per attn1 layer and UNet row, M earlier frames' K, V and outputs.

    Storage, allocated once per (rows, M): per layer K, V, O as (rows, M·N, C), the tokens'
    validity (rows, M·N), 1 or 0 in the UNet's dtype, and the attention bias it gives ((rows, (1 + M)·N), refreshed in
    place), with the buffers `forget` pools the motion into. The engine arms
    it around its own UNet calls (`call`, which also gives stateless seams their `BankIO`), says
    which bank rows the call's rows are (None: all, the stream call) and whether to record, and
    commits a recorded call once its frame succeeded (`commit`): a failed frame leaves the bank
    as it was. Before each processed call the engine has it `forget` where the input moved.
    """

    def __init__(self, unet: torch.nn.Module, latent_hw: tuple[int, int]) -> None:
        self._unet = unet
        self._latent_hw = latent_hw
        self.layers = self_attention_layers(unet)
        self._tokens = [layer.tokens(latent_hw) for layer in self.layers]  # N per layer
        self._grids = [grid(latent_hw, level) for level in range(1 + max((la.level for la in self.layers), default=0))]
        self._installed = False
        self.size = 4
        self.fusion = 0.8
        self.threshold = 0.98
        self.io: BankIO | None = None  # set while armed
        self._rows = 0
        self._storage: list[Features] = []
        self._valid: list[torch.Tensor] = []  # per layer (rows, M·N): 1 where a token counts, else 0
        self._bias: list[torch.Tensor] = []  # per layer (rows, (1 + M)·N): `attention_bias` of _valid
        self._padded: list[torch.Tensor] = []  # per level ≥ 1: (rows, 2h, 2w), the level above, zero-padded
        self._pooled: list[torch.Tensor] = []  # per level ≥ 1: (rows, h, w), the motion max-pooled to its tokens
        self._still: list[torch.Tensor] = []  # per level: (rows, h·w), 1 where a token's area did not move
        self._pending: list[Features | None] | None = None
        self.filled = 0
        self._next = 0

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Put the banked processors on the UNet's attn1 layers (the originals are kept)."""
        if self._installed:
            return
        for i, layer in enumerate(self.layers):
            processor = layer.module.processor
            if not isinstance(processor, _BankedProcessor):
                processor = _BankedProcessor(i, processor)
                layer.module.set_processor(processor)
            processor.banks.append(self)
        self._installed = True

    def remove(self) -> None:
        """Leave the UNet's processors (the last bank out gives the UNet its own back) and free
        the storage. Safe twice."""
        if self._installed:
            for layer in self.layers:
                processor = layer.module.processor
                if isinstance(processor, _BankedProcessor):
                    processor.banks = [b for b in processor.banks if b is not self]
                    if not processor.banks:
                        layer.module.set_processor(processor.original)
            self._installed = False
        self._free()
        self._rows = 0

    def _free(self) -> None:
        self._storage, self._valid, self._bias = [], [], []
        self._padded, self._pooled, self._still = [], [], []

    def configure(self, *, size: int, fusion: float, threshold: float) -> None:
        """New settings; a new size empties the bank (its storage is sized by it)."""
        self.fusion, self.threshold = fusion, threshold
        if size != self.size:
            self.size = size
            self._free()
            self.reset()

    def reset(self, rows: int | None = None) -> None:
        """Empty the bank; sized for `rows` UNet rows when given (a new layout)."""
        with torch.inference_mode():  # the storage is written under the engine's inference mode
            self._reset(rows)

    def _reset(self, rows: int | None) -> None:
        if rows is not None and rows != self._rows:
            self._rows = rows
            self._free()
        if not self._storage and self._rows:
            param = next(self._unet.parameters())
            rows, M = self._rows, self.size

            def zeros(*shape: int, dtype: torch.dtype = param.dtype) -> torch.Tensor:
                return torch.zeros(shape, device=param.device, dtype=dtype)

            self._storage = [
                (zeros(rows, M * n, layer.channels), zeros(rows, M * n, layer.channels), zeros(rows, M * n, layer.channels))
                for layer, n in zip(self.layers, self._tokens, strict=True)
            ]
            # 0/1 in the UNet's dtype, not bool: forgetting is a product, the bias a sum and a log
            # (no conversion, so no allocation per frame).
            self._valid = [zeros(rows, M * n) for n in self._tokens]
            self._bias = [zeros(rows, (1 + M) * n) for n in self._tokens]
            self._padded = [zeros(rows, 2 * h, 2 * w) for h, w in self._grids[1:]]
            self._pooled = [zeros(rows, h, w) for h, w in self._grids[1:]]
            self._still = [zeros(rows, h * w) for h, w in self._grids]
        for valid in self._valid:
            valid.zero_()
        self._pending = None
        self.filled = 0
        self._next = 0
        self._refresh_bias()

    def _refresh_bias(self) -> None:
        if not self._storage:
            return
        for valid, bias, n in zip(self._valid, self._bias, self._tokens, strict=True):
            attention_bias(valid.view(self._rows, self.size, n), self.filled, out=bias)

    def storage(self) -> list[Features]:
        """Per layer (K, V, O) of every row, (rows, M·N, C): the ring itself (tests, exports)."""
        return self._storage

    def validity(self) -> list[torch.Tensor]:
        """Per layer (rows, M, N) bool: the tokens that count, per row and slot (a copy)."""
        return [valid.view(self._rows, self.size, n) > 0 for valid, n in zip(self._valid, self._tokens, strict=True)]

    def forget(self, motion: torch.Tensor, threshold: float = MOTION_HIGH) -> None:
        """Forget, in every slot, the tokens whose area moved: motion (rows, 1, h, w) is each bank
        row's input motion at the latent's size (motion.py); a token counts as moved where any
        latent pixel of its area moved by more than `threshold` (max-pooled, 2×2 per level as the
        UNet downsamples). Slots written later are valid everywhere: they hold the new scene."""
        if not self._storage:
            return
        rows = self._rows
        maps = [motion.view(rows, *self._latent_hw)]
        for padded, pooled in zip(self._padded, self._pooled, strict=True):
            above = maps[-1]
            # Zero padding (motion ≥ 0) where the level above has an odd size: ⌈n/2⌉ tokens.
            padded[:, : above.shape[1], : above.shape[2]].copy_(above)
            torch.amax(padded.unflatten(2, (pooled.shape[2], 2)).unflatten(1, (pooled.shape[1], 2)), dim=(2, 4),
                       out=pooled)
            maps.append(pooled)
        for level_map, still in zip(maps, self._still, strict=True):
            torch.le(level_map.flatten(1), threshold, out=still)
        for valid, layer, n in zip(self._valid, self.layers, self._tokens, strict=True):
            valid.view(rows, self.size, n).mul_(self._still[layer.level].unsqueeze(1))
        self._refresh_bias()

    @contextmanager
    def call(self, select: torch.Tensor | None = None, *, record: bool = False, full: bool = False) -> Iterator[BankIO]:
        """Arm the processors for one UNet call of this engine; yields the call's `BankIO`.

        select: the bank rows of the call's rows (None: every row, the stream call). record: keep
        the call's features for `commit`. full: give every layer's tensors even while the bank is
        empty (a graph with fixed inputs); otherwise an empty bank is plain attention."""
        empty = self.filled == 0 or not self._storage
        # Slots fill in order from 0, so until the ring is full the written ones are a prefix:
        # eager calls attend to that prefix alone (no work on empty slots); a graph with fixed
        # inputs gets every slot.
        slots = self.size if full else self.filled
        n_layers = len(self.layers)
        layers: list[Features | None] = [None] * n_layers
        bias: list[torch.Tensor | None] = [None] * n_layers
        if full or not empty:
            for i, (kvo, b, n) in enumerate(zip(self._storage, self._bias, self._tokens, strict=True)):
                prefix = (*(t[:, : slots * n] for t in kvo), b[:, : (1 + slots) * n])
                if select is not None:
                    prefix = tuple(t.index_select(0, select) for t in prefix)
                layers[i], bias[i] = prefix[:3], prefix[3]  # type: ignore[assignment]
        io = BankIO(layers, bias, self.fusion, self.threshold, recorded=[None] * n_layers)
        self.io = io
        try:
            yield io
        finally:
            self.io = None
        if record:
            self._pending = io.recorded

    def commit(self) -> None:
        """Write the recorded call into the next ring slot (after its frame succeeded)."""
        pending, self._pending = self._pending, None
        if pending is None or any(p is None for p in pending) or not self._storage:
            return
        slot = self._next
        for stored, valid, recorded in zip(self._storage, self._valid, pending, strict=True):
            assert recorded is not None
            tokens = recorded[0].shape[1]
            for ring, new in zip(stored, recorded, strict=True):
                ring[:, slot * tokens : (slot + 1) * tokens] = new
            valid[:, slot * tokens : (slot + 1) * tokens] = 1.0
        self._next = (slot + 1) % self.size
        self.filled = min(self.filled + 1, self.size)
        self._refresh_bias()

    def discard(self) -> None:
        """Forget a recorded call whose frame failed."""
        self._pending = None


class BankedUNetStep(torch.nn.Module):
    """The UNet with the bank as explicit inputs and outputs, for export (the graph holds no state):

        (sample, timestep, encoder_hidden_states, fusion (), threshold (),
         B_0, K_0, V_0, O_0, B_1, …)  →  (ε, K_0', V_0', O_0', K_1', …)

    B_i: layer i's attention bias (rows, (1 + M)·N_i) (`attention_bias`); K_i, V_i, O_i: its bank rows
    (rows, M·N_i, C_i); the outputs: this call's (rows, N_i, C_i). The bank's processors must be
    installed (`FeatureBank.install`)."""

    def __init__(self, unet: torch.nn.Module, bank: FeatureBank) -> None:
        super().__init__()
        self.unet = unet
        self._bank = bank

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        fusion: torch.Tensor, threshold: torch.Tensor, *features: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = len(self._bank.layers)
        layers: list[Features | None] = [
            (features[4 * i + 1], features[4 * i + 2], features[4 * i + 3]) for i in range(n)
        ]
        bias: list[torch.Tensor | None] = [features[4 * i] for i in range(n)]
        io = BankIO(layers, bias, fusion, threshold, recorded=[None] * n)
        self._bank.io = io
        try:
            eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        finally:
            self._bank.io = None
        return (eps, *(t for kvo in io.recorded for t in kvo))  # type: ignore[union-attr]


def bank_io_names(layers: Sequence[BankLayer]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The bank's graph inputs (after the seam's three) and outputs (after ε), in order."""
    inputs = ["bank_fusion", "bank_threshold"]
    outputs = []
    for i in range(len(layers)):
        inputs += [f"bank_bias{i}", f"bank_k{i}", f"bank_v{i}", f"bank_o{i}"]
        outputs += [f"new_k{i}", f"new_v{i}", f"new_o{i}"]
    return tuple(inputs), tuple(outputs)
