"""Text conditioning per model family: prompts → what the UNet is conditioned on, packed in one tensor.

- **SD1.x / SD2.x** (`ClipConditioning`): one CLIP text encoder; the UNet cross-attends over its
  last hidden state, (N, 77, D).
- **SDXL** (`SdxlConditioning`, SDXL-Turbo included): two text encoders; the UNet cross-attends
  over both *penultimate* hidden states side by side, (N, 77, D₁ + D₂), and its `text_time`
  addition embedding also takes the second encoder's pooled, projected embedding
  (`text_embeds`, N × P) and six numbers (`time_ids`: original height and width, crop top and
  left, target height and width; here the output size, no crop, as diffusers' pipelines default).

The stream engine caches, blends (linear or per-token slerp), transitions (lerp) and mixes per
brush (lerp) one embedding tensor per prompt. So that all of that works unchanged for every
family, a prompt's conditioning is *packed*: its hidden states, then, for SDXL, one more token
row holding the pooled embedding, zero-padded to D. Every operation the engine applies to
embeddings acts row by row (a weighted sum, a lerp, a slerp of each token vector), so on the
packed tensor it applies to the pooled embedding exactly what it applies to the hidden states:
blending two SDXL prompts blends both (the zero padding stays zero and does not change a norm or
an angle). `unet_inputs()` unpacks the rows at the UNet seam: `encoder_hidden_states`, and the
keyword-only `added_cond` the seam passes on (`unet_call(x, t, emb, *, added_cond=...)`).

The empty negative prompt: SDXL models that declare `force_zeros_for_empty_prompt` (SDXL and
SDXL-Turbo do) take zeros as the unconditional embedding when no negative prompt is given,
not the encoding of "". `negative_is_zero("")` says so; the engine follows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

MAX_TOKENS = 77
"""CLIP's context: prompts are truncated at 77 tokens (start and end included)."""

AddedCond = Mapping[str, torch.Tensor]
"""The UNet's extra conditioning, diffusers' `added_cond_kwargs`: for SDXL {"text_embeds": (rows, P),
"time_ids": (rows, 6)}."""



class TextConditioning(Protocol):
    """What a model family's conditioning does for the engine."""

    family: str
    tokens: int
    """Token rows of a packed embedding (77, or 78 with SDXL's pooled row)."""
    width: int
    """Width of a token row: the UNet's cross_attention_dim."""
    pooled_dim: int
    """Width of the pooled embedding (0: none)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, width) packed embeddings, in the model's dtype, on its device."""
        ...

    def negative_is_zero(self, text: str) -> bool:
        """True when this negative prompt's embedding is all zeros rather than its encoding."""
        ...

    def unet_inputs(
        self, packed: torch.Tensor, *, height: int, width: int
    ) -> tuple[torch.Tensor, AddedCond | None]:
        """Packed rows (rows, tokens, width) → (encoder_hidden_states, added_cond or None) for an
        image of height×width pixels. Views, no copies, except SDXL's (rows, 6) time ids once
        per row count and size."""
        ...


def _token_ids(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=min(int(tokenizer.model_max_length), MAX_TOKENS),
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class ClipConditioning:
    """SD1.x / SD2.x: one CLIP text encoder, last hidden state; no extra conditioning."""

    family = "sd"
    pooled_dim = 0

    def __init__(self, text_encoder: Any, tokenizer: Any, *, dtype: torch.dtype, device: torch.device) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.tokens = MAX_TOKENS
        self.width = int(text_encoder.config.hidden_size)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = _token_ids(self.tokenizer, prompts, self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def negative_is_zero(self, text: str) -> bool:
        return False

    def unet_inputs(self, packed: torch.Tensor, *, height: int, width: int) -> tuple[torch.Tensor, AddedCond | None]:
        return packed, None


class SdxlConditioning:
    """SDXL: two CLIP text encoders (penultimate hidden states side by side), the second's pooled
    projection and the size `time_ids`, for a UNet with `addition_embed_type="text_time"`."""

    family = "sdxl"

    def __init__(
        self,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        *,
        dtype: torch.dtype,
        device: torch.device,
        zero_empty_negative: bool = False,
        time_ids_count: int = 6,
    ) -> None:
        self.encoders = ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2))
        self.dtype = dtype
        self.device = device
        self.zero_empty_negative = zero_empty_negative
        self.width = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
        self.pooled_dim = int(text_encoder_2.config.projection_dim)
        if self.pooled_dim > self.width:
            raise ValueError(
                f"pooled width {self.pooled_dim} is wider than the token rows ({self.width}): "
                "these text encoders do not make an SDXL model"
            )
        if time_ids_count != 6:
            # The refiner's five (with an aesthetic score) are another conditioning.
            raise ValueError(f"this UNet takes {time_ids_count} time ids; SDXL base models take 6")
        self.tokens = MAX_TOKENS + 1
        self._time_ids: dict[tuple[int, int, int], torch.Tensor] = {}

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        hidden = []
        pooled: torch.Tensor | None = None
        for encoder, tokenizer in self.encoders:
            out = encoder(_token_ids(tokenizer, prompts, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled projection
                pooled = out[0]
        if pooled is None:
            raise ValueError("the second text encoder gives no pooled projection (it must be CLIPTextModelWithProjection)")
        packed = torch.zeros((len(prompts), self.tokens, self.width), device=self.device, dtype=self.dtype)
        packed[:, :MAX_TOKENS] = torch.cat(hidden, dim=-1)
        packed[:, MAX_TOKENS, : self.pooled_dim] = pooled
        return packed

    def negative_is_zero(self, text: str) -> bool:
        return self.zero_empty_negative and text == ""

    def unet_inputs(self, packed: torch.Tensor, *, height: int, width: int) -> tuple[torch.Tensor, AddedCond | None]:
        rows = packed.shape[0]
        key = (rows, height, width)
        time_ids = self._time_ids.get(key)
        if time_ids is None or time_ids.device != packed.device or time_ids.dtype != packed.dtype:
            # original (h, w), crop (top, left), target (h, w): the frame as it is, uncropped.
            one = torch.tensor([height, width, 0, 0, height, width], device=packed.device, dtype=packed.dtype)
            time_ids = self._time_ids[key] = one.expand(rows, 6).contiguous()
        return packed[:, :MAX_TOKENS], {"text_embeds": packed[:, MAX_TOKENS, : self.pooled_dim], "time_ids": time_ids}


def for_components(c: Any) -> TextConditioning:
    """The conditioning of loaded components, chosen by what the UNet declares (its config), never a name."""
    addition = getattr(c.unet.config, "addition_embed_type", None)
    if addition is None:
        return ClipConditioning(c.text_encoder, c.tokenizer, dtype=c.dtype, device=c.device)
    if addition == "text_time":
        if c.text_encoder_2 is None or c.tokenizer_2 is None:
            raise ValueError("this UNet takes SDXL conditioning (text_time) but the model has no text_encoder_2/tokenizer_2")
        in_features = int(c.unet.add_embedding.linear_1.in_features)
        per_id = int(c.unet.config.addition_time_embed_dim)
        pooled = int(c.text_encoder_2.config.projection_dim)
        return SdxlConditioning(
            c.text_encoder, c.tokenizer, c.text_encoder_2, c.tokenizer_2, dtype=c.dtype, device=c.device,
            zero_empty_negative=c.zero_empty_negative, time_ids_count=(in_features - pooled) // max(per_id, 1),
        )
    raise ValueError(f"UNet addition_embed_type {addition!r} is not a conditioning streamnode knows (SD1/SD2, SDXL)")
