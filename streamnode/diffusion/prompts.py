"""Prompt embeddings: an LRU cache keyed by text, and weighted blending (linear or slerp).

A VJ flips between a handful of prompts; each text is encoded once and then served from the
cache, so a flip costs a dictionary look-up and a tensor copy, never a text-encoder pass.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from streamnode.live_params import LiveParams

logger = logging.getLogger(__name__)

BlendMethod = Literal["linear", "slerp"]
BLEND_METHODS: tuple[str, ...] = get_args(LiveParams.model_fields["blend_method"].annotation)


class PromptCache:
    """text → (1, 77, D) embedding, least recently used first out.

    `encode` takes a list of texts and returns (N, 77, D); misses are encoded in one batch.
    `encodes` counts texts that really went through the text encoder.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], maxsize: int = 64) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._encode = encode
        self._maxsize = maxsize
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encodes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, text: str) -> bool:
        return text in self._entries

    def get_many(self, texts: Sequence[str]) -> list[torch.Tensor]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._entries]
        if missing:
            encoded = self._encode(missing)
            self.encodes += len(missing)
            for text, emb in zip(missing, encoded, strict=True):
                self._entries[text] = emb.unsqueeze(0)
        out = []
        for text in texts:
            self._entries.move_to_end(text)
            out.append(self._entries[text])
        while len(self._entries) > self._maxsize:
            evicted, _ = self._entries.popitem(last=False)
            logger.debug("prompt cache full: evicted %r", evicted[:40])
        return out

    def get(self, text: str) -> torch.Tensor:
        return self.get_many([text])[0]

    def clear(self) -> None:
        self._entries.clear()


def check_weights(weights: Sequence[float], what: str) -> list[float]:
    """Blend weights: finite, ≥ 0, not all zero. Returns them as floats."""
    out = []
    for w in weights:
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: weight {w!r} is not a number") from None
        if not math.isfinite(w) or w < 0.0:
            raise ValueError(f"{what}: weight {w!r} must be a finite number ≥ 0")
        out.append(w)
    if not out:
        raise ValueError(f"{what}: give at least one (value, weight) pair")
    if sum(out) <= 0.0:
        raise ValueError(f"{what}: the weights sum to 0; give at least one positive weight")
    return out


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation per token vector (last dimension), falling back to lerp when parallel.

    The angle comes from the directions; the magnitude is interpolated linearly, so a blend of
    two embeddings of similar norm keeps that norm instead of shrinking through the chord.
    """
    v0f, v1f = v0.float(), v1.float()
    n0, n1 = v0f.norm(dim=-1, keepdim=True), v1f.norm(dim=-1, keepdim=True)
    u0, u1 = v0f / n0.clamp_min(1e-12), v1f / n1.clamp_min(1e-12)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    parallel = sin.abs() < eps
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_sin)
    w1 = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    direction = w0 * u0 + w1 * u1
    # sin-weights of unit vectors give a unit vector; lerp (the parallel case) may not.
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    magnitude = (1.0 - t) * n0 + t * n1
    return (direction * magnitude).to(v0.dtype)


def blend_embeddings(embeddings: Sequence[torch.Tensor], weights: Sequence[float], method: str) -> torch.Tensor:
    """Weighted blend of prompt embeddings (each (1, 77, D)).

    linear: Σ wᵢ·eᵢ / Σ wᵢ.
    slerp:  folded pairwise, in order: e ← slerp(e, eᵢ, wᵢ / (w₀ + … + wᵢ)), which for two
            prompts is slerp(e₀, e₁, w₁ / (w₀ + w₁)); weights are normalised the same way.
    """
    if method not in BLEND_METHODS:
        raise ValueError(f"blend_method {method!r}: must be one of {', '.join(BLEND_METHODS)}")
    if len(embeddings) != len(weights) or not embeddings:
        raise ValueError("blend_embeddings: one weight per embedding, at least one")
    if len(embeddings) == 1:
        return embeddings[0]
    total = float(sum(weights))
    if method == "linear":
        out = sum(e.float() * (w / total) for e, w in zip(embeddings, weights, strict=True))
        return out.to(embeddings[0].dtype)  # type: ignore[union-attr]
    out, acc = embeddings[0], float(weights[0])
    for e, w in zip(embeddings[1:], weights[1:], strict=True):
        if w == 0.0:
            continue
        acc += float(w)
        out = e if acc == w else slerp(out, e, float(w) / acc)
    return out
