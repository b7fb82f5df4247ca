"""StreamEngine: StreamDiffusion-style stream-batch img2img / txt2img (DESIGN.md, "The stream-batch engine").

Notation: T = len(t_index_list) denoising stages, F = frame_buffer_size frames per call,
B = T·F rows. Rows are laid out stage-major, then frame: row k·F + f is frame f at stage k.
Stage 0 holds the newest frames, stage T−1 the frames that leave (are decoded) this call.
For stage k: τ_k, a_k = sqrt(ᾱ(τ_k)), b_k = sqrt(1 − ᾱ(τ_k)), c_skip_k, c_out_k (schedule.py),
and a fixed noise n_k drawn once per seed and shared by the F frames of the stage (so
consecutive frames see the same noise: that is what keeps the video temporally stable).

One call (`_stream_step`):

    X_0     = a_0·E(frame) + b_0·n_0                           the new frames enter stage 0
    X_k     = a_k·x0_{k−1} + b_k·n_k          (k ≥ 1)          last call's x0 of stage k−1, re-noised
    ε       = UNet([negative rows ;] X, τ, embeddings)          ONE call, `batch_rows` rows
    ε̂       = ε_u + g·(ε_c − ε_u)   if g > 1, else ε_c          (RCFG below)
    x0_k    = c_out_k·(X_k − b_k·ε̂_k)/a_k + c_skip_k·X_k        LCM step with boundary condition
    output  = D(x0_{T−1})

The state carried from call to call is x0 of every stage (and, for self/initialize, the
RCFG residual R below); the re-noising to the next stage happens at the start of the next
call with the schedule and noises in force *then*. So a seed or t_index change takes effect
on the very next frame without any half-denoised latent: every row is a clean x0 estimate
re-noised to exactly its stage's level.

RCFG (`cfg_type`) and UNet rows per call:
    none        B       ε̂ = ε_c
    full        2B      ε_u = UNet(X, negative prompt) for every row
    self        B       ε_u = δ·s, s the "stock noise" carried per row (no UNet cost)
    initialize  B + F   like self, but stage 0 evaluates the real negative prompt: s_0 ← ε_neg
The stock noise of row i at stage k: s = n_0 for stage 0, and s_k = n_k + (a_k/b_k)·R_{k−1}
for k ≥ 1, with the residual R = c_out·b·(s − ε̂)/a + c_skip·b·s of the previous stage. If the
latent is X = a·z + b·s (z the input frame's latent), x0 = z + (b/a)(s − ε̂): s is the noise
the latent still carries relative to the input, so δ·s as the negative pushes the result away
from the unmodified input at no UNet cost.

Regional prompts (regions.py): with n active brushes every stream row is evaluated once per
layer (P = n + 1: the global prompt, then the brushes in cover order) on the same latent, in the
same single call: rows stage-major, then frame, then layer, and every row count above times P.
The layers' x0 (and R) are fused per stage with the brushes' quantized cover weights before
they are carried, x0_k = Σ_p W_{p,k}·x0_{p,k}, so the carried state, the re-noising and the
cost without brushes are exactly the above.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch

from streamnode.config import StreamConfig
from streamnode.diffusion.conditioning import AddedCond
from streamnode.diffusion.controlnet import Control, ControlPlan, ControlStack
from streamnode.diffusion.feature_bank import FeatureBank
from streamnode.diffusion.lora import LoraPlan, LoraStack, StalePlan
from streamnode.diffusion.motion import InputMotion
from streamnode.diffusion.prompts import PromptCache, blend_embeddings
from streamnode.diffusion.regions import Regions
from streamnode.diffusion.schedule import LcmSchedule
from streamnode.diffusion.similarity import SimilarityFilter
from streamnode.diffusion.smoothing import OutputSmoother
from streamnode.live_params import LiveParams, LiveState, validated

logger = logging.getLogger(__name__)

CfgType = Literal["none", "full", "self", "initialize"]
CFG_TYPES: tuple[str, ...] = ("none", "full", "self", "initialize")

class UnetCall(Protocol):
    """The UNet seam: (x (rows, 4, h, w), t (rows,) long, encoder_hidden_states (rows, 77, D)) → model
    output (rows, 4, h, w). `added_cond`, keyword-only, is the family's extra conditioning
    (conditioning.py; SDXL: {"text_embeds": (rows, P), "time_ids": (rows, 6)}); it is passed only
    when the model has one, so an SD1/SD2 seam may be any plain 3-argument callable. `control`,
    keyword-only, is the ControlNets' summed residuals per row (controlnet.py: (down residuals,
    mid residual), diffusers' `down_block_additional_residuals`, `mid_block_additional_residual`),
    passed only while a ControlNet acts."""

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, added_cond: AddedCond | None = None,
        control: Control | None = None,
    ) -> torch.Tensor: ...

VaeCall = Callable[[torch.Tensor], torch.Tensor]

UPDATE_KEYS = frozenset({*LiveParams.model_fields, "brush", "brush_order", "lora", "controlnet"})
"""What `StreamEngine.update()` accepts: the live parameters (live_params.LiveParams), `brush`
((index, field, value) or (index, {field: value, ...}); regions.py), `brush_order`, `lora`
(the same edit shapes, or a plan from `prepare_lora()`; lora.py) and `controlnet` (the same
edit shapes, or a plan from `prepare_controlnet()`; controlnet.py)."""

# Live fields that do not alter the output; after any other change the similarity filter stands
# aside until the change has flowed through every stage (a static input would otherwise freeze
# the old look).
_QUIET_FIELDS = frozenset({"similarity_threshold", "similarity_max_skip", "prompt_transition_frames"})

_FLOAT_FRAME_SLACK = 1e-3
"""Float frames are RGB in [0, 1]; this much rounding outside is tolerated (and clamped by the VAE)."""


class _Kind(NamedTuple):
    """What the caller gave, so the output comes back as the same kind and shape."""

    container: Literal["np", "u8", "float"]
    batched: bool
    device: torch.device | None = None
    dtype: torch.dtype | None = None


def _indexed_fields(value: Any, what: str = "brush") -> tuple[Any, dict[str, Any]]:
    """`update(brush=...)`, `update(lora=...)`: (index, field, value) or (index, {field: value, ...})
    → (index, fields)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 3 and isinstance(value[1], str):
            return value[0], {value[1]: value[2]}
        if len(value) == 2 and isinstance(value[1], Mapping):
            return value[0], dict(value[1])
    example = {"brush": "(0, 'prompt', 'flames')", "lora": "(0, 'weight', 0.8)"}.get(what, "(0, 'scale', 0.8)")
    raise ValueError(f"{what}: give (index, field, value) or (index, {{field: value, ...}}), e.g. {example}")


class StreamEngine:
    """Stream-batch img2img / txt2img over one set of model components.

    Frozen at construction: the components, width, height, frame_buffer_size, cfg_type.
    Live (`update()`, applied between frames): prompts, guidance, delta, t_index_list /
    strength, seed, similarity filter, prompt transition, brushes, the LoRA stack; `params` is
    what is in force. Fixed too: `lora_mode` ("runtime" or "merged", lora.py).

    Backends are swappable: `unet_call(x, t, emb, *, added_cond)`, `vae_encode(img)` and `vae_decode(z)`
    are plain attributes and every UNet/VAE evaluation (stream, warm fill, reference) goes
    through them. The UNet batch has `batch_rows` rows, fixed by (T, F, cfg_type); the
    images handed to the VAE are (N, 3, H, W) in [-1, 1] in channels-last memory, latents
    (N, 4, H/8, W/8). `stats` counts unet_calls, vae_encodes, vae_decodes, text_encodes,
    frames and skipped (both in frames, F per call) and warm_fills.

    Not thread-safe: one thread calls frames and `update()` (the node's engine thread).
    """

    def __init__(
        self,
        components: Any,
        *,
        t_index_list: Sequence[int] = (32, 45),
        width: int = 512,
        height: int = 512,
        frame_buffer_size: int = 1,
        cfg_type: CfgType = "self",
        seed: int = 2,
        strength: float | None = None,
        similarity_threshold: float = 0.0,
        similarity_max_skip: int = 10,
        prompt_transition_frames: int = 4,
        blend_method: str = "linear",
        prompt_cache_size: int = 64,
        max_brushes: int = 8,
        lora_mode: str = "runtime",
        max_loras: int = 8,
        max_controlnets: int = 4,
    ) -> None:
        fixed = validated(
            StreamConfig, {"width": width, "height": height, "frame_buffer_size": frame_buffer_size, "cfg_type": cfg_type}
        )
        unet_config = components.unet.config
        if getattr(unet_config, "time_cond_proj_dim", None):
            raise ValueError(
                "this UNet expects a guidance embedding (a full LCM model such as LCM_Dreamshaper); "
                "use its base model with lcm_lora=... instead"
            )
        prediction = components.scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {prediction!r} is not supported")

        self.components = components
        self.width: int = fixed.width
        self.height: int = fixed.height
        self.frame_buffer_size: int = fixed.frame_buffer_size
        self.cfg_type: str = fixed.cfg_type
        self.device: torch.device = components.device
        self.dtype: torch.dtype = components.dtype
        factor = components.vae_scale_factor
        self.latent_shape = (int(unet_config.in_channels), self.height // factor, self.width // factor)
        self._prediction = prediction

        self.stats: dict[str, int] = dict.fromkeys(
            ("unet_calls", "vae_encodes", "vae_decodes", "text_encodes", "frames", "skipped", "warm_fills"), 0
        )

        # The acceleration seam: replace these three to swap backends (accel/).
        unet = components.unet

        def eager_unet(
            x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, *, added_cond: AddedCond | None = None,
            control: Control | None = None,
        ) -> torch.Tensor:
            down, mid = control if control is not None else (None, None)
            return unet(
                x, t, encoder_hidden_states=emb, added_cond_kwargs=added_cond, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False,
            )[0]

        self.unet_call: UnetCall = eager_unet
        self._eager_unet = eager_unet  # the feature bank's path when a backend cannot take the bank
        # The model family's conditioning (conditioning.py): packs prompts, unpacks rows for the seam.
        self._conditioning = components.conditioning
        self.vae_encode: VaeCall = components.encode_image
        self.vae_decode: VaeCall = components.decode_latents

        # A private scheduler: configuring it (set_timesteps) must not touch the shared components.
        self._scheduler = type(components.scheduler).from_config(components.scheduler.config)
        # Not a bound method: the cache (held by the regions too) must not hold the engine (see close).
        self._prompts = PromptCache(functools.partial(_encode_texts, components, self.stats), maxsize=prompt_cache_size)
        self._filter = SimilarityFilter(seed=seed)
        self._regions = Regions(
            width=self.width, height=self.height, latent_hw=self.latent_shape[1:], max_brushes=max_brushes,
            encode=self._prompts.get_many, device=self.device, dtype=self.dtype,
        )
        # For converting v / x0 predictions to ε: sqrt(ᾱ(t)), sqrt(1 − ᾱ(t)) for every train t.
        acp = self._scheduler.alphas_cumprod.double()
        self._sqrt_acp = acp.sqrt().to(self.device, self.dtype)
        self._sqrt_1m_acp = (1.0 - acp).sqrt().to(self.device, self.dtype)

        F = self.frame_buffer_size
        # Channels-last (NHWC memory): a uint8 H×W×3 frame converts in one contiguous pass, and
        # the VAE's convolutions run faster on NHWC (oneDNN on the CPU, cuDNN on the GPU).
        self._img = torch.empty(
            (F, 3, self.height, self.width), device=self.device, dtype=self.dtype
        ).contiguous(memory_format=torch.channels_last)
        self._minus_one = torch.tensor(-1.0, device=self.device, dtype=self.dtype)
        # Output levels in float32, channels-last: memory already in H×W×3 order, so the uint8
        # conversion is a contiguous cast (the CHW → HWC transpose rides on the scaling pass).
        self._levels = torch.empty(
            (F, 3, self.height, self.width), device=self.device, dtype=torch.float32
        ).contiguous(memory_format=torch.channels_last)
        self._level_offset = torch.tensor(128.0, device=self.device, dtype=torch.float32)
        # Pinned staging: numpy frames reach the GPU by one asynchronous copy.
        self._pinned: torch.Tensor | None = None
        self._u8: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._pinned = torch.empty((F, self.height, self.width, 3), dtype=torch.uint8, pin_memory=True)
            self._u8 = torch.empty((F, self.height, self.width, 3), dtype=torch.uint8, device=self.device)

        # The parameters the engine starts from (prepare() without a snapshot); filled by prepare().
        self._initial: LiveParams = validated(LiveParams, {
            "t_index_list": tuple(t_index_list), "strength": strength, "seed": seed,
            "similarity_threshold": similarity_threshold, "similarity_max_skip": similarity_max_skip,
            "prompt_transition_frames": prompt_transition_frames, "blend_method": blend_method,
        })
        self._params = self._initial
        self._live = LiveState(params=self._params)
        self._closers: list[Callable[[], None]] = []
        # The LoRA stack (lora.py) on this engine's UNet, and who must hear when it changes the
        # UNet's weights (an accelerated UNet built with the old ones: accel/).
        self._loras = LoraStack(components.unet, mode=lora_mode, max_loras=max_loras)
        self._weight_listeners: list[Callable[[bool], None]] = []
        self._closed = False
        # The ControlNets (controlnet.py): their maps move through the stages with the frames.
        self._control = ControlStack(components, width=self.width, height=self.height, max_nets=max_controlnets)
        self._schedule: LcmSchedule | None = None
        self._stage_noise: torch.Tensor | None = None  # (T, 4, h, w) float32 CPU, one per stage
        # (2, L, D): [negative, positive], packed prompt embeddings (L = 77, or 78 for SDXL: conditioning.py)
        self._emb_current: torch.Tensor | None = None
        self._transition: list[Any] | None = None  # [from, to, frames done, frames total]
        self._rows_dirty = True
        self._cold = True
        self._settle = 0
        self._x0_prev: torch.Tensor | None = None
        self._resid_prev: torch.Tensor | None = None
        self._last_image: torch.Tensor | None = None
        # Temporal consistency (docs/temporal.md): the feature bank exists (its processors on the
        # UNet) only while it is on; the smoother's and the input motion's buffers are small and
        # always there (the motion is computed only while the bank or motion-aware smoothing is on).
        self._bank: FeatureBank | None = None
        self._bank_fallback_logged = False
        self._bank_tick = 0  # processed calls since the stream (re)started: every interval-th records
        self._smoother = OutputSmoother(self.latent_shape, self.frame_buffer_size, device=self.device, dtype=self.dtype)
        self._motion = InputMotion(self.latent_shape[1:], self.frame_buffer_size, device=self.device, dtype=self.dtype)
        self.prepare()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_components(cls, components: Any, **kwargs: Any) -> StreamEngine:
        """Build on already loaded components (tests share one set across many engines)."""
        return cls(components, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        use_tiny_vae: bool = True,
        tiny_vae: str | None = None,
        lcm_lora: str | None = None,
        cpu_threads: int | None = None,
        **kwargs: Any,
    ) -> StreamEngine:
        """Load `model` (hub id, folder, .safetensors or 'tiny') and build an engine on it."""
        from streamnode.diffusion.models import load_components

        components = load_components(
            model, device=device, dtype=dtype, use_tiny_vae=use_tiny_vae, tiny_vae=tiny_vae, lcm_lora=lcm_lora,
            cpu_threads=cpu_threads,
        )
        return cls(components, **kwargs)

    # -- read-only views -------------------------------------------------------------------

    @property
    def params(self) -> LiveParams:
        """The live parameters in force (immutable, replaced whole by `update()`)."""
        return self._params

    def live_params(self) -> LiveState:
        """Everything live in force, brushes and their cover order included: an immutable snapshot,
        rebuilt by the engine thread after each change, so any thread may read it."""
        return self._live

    def on_close(self, release: Callable[[], None]) -> None:
        """Run `release` at `close()` (last registered, first run): acceleration backends register
        the release of their engines and sessions here (accel/)."""
        self._closers.append(release)

    def on_weights_change(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(structure)` on the engine thread after a LoRA edit changed what the UNet
        computes; `structure`: LoRAs (runtime hooks) were added or removed, not only weights."""
        self._weight_listeners.append(listener)

    def close(self) -> None:
        """Release what the engine holds beyond its Python objects (accelerated engines, device
        buffers), give the UNet back as loaded (no LoRA), and break the reference cycles through
        the engine. Safe twice; the engine must not be called afterwards (its counters and
        inspection properties still read).

        Without the last step its model would outlive the engine until a full garbage collection,
        and never once the heap is frozen (node/heap.py): after a model switch, two models in
        memory (tests/test_node_live.py frees one with the collector off)."""
        if self._closed:
            return
        self._loras.close()
        self._control.close()
        self._set_bank(None)
        closers, self._closers = self._closers, []
        for release in reversed(closers):
            try:
                release()
            except Exception:  # noqa: BLE001 - the rest must still be released
                logger.warning("releasing an engine resource failed", exc_info=True)
        self._x0_prev = self._resid_prev = self._last_image = None
        self._transition = None
        self._weight_listeners.clear()  # the backends' listeners are closures over the engine
        self._closed = True

    @property
    def t_index_list(self) -> list[int]:
        return list(self._params.t_index_list)

    @property
    def steps(self) -> int:
        """T: denoising stages per frame (frames leave T − 1 calls after they enter)."""
        return self._params.steps

    @property
    def delay_calls(self) -> int:
        """Engine calls between a frame going in and its result coming out: T − 1."""
        return self.steps - 1

    @property
    def negative_rows(self) -> int:
        """UNet rows evaluated with the negative prompt (they come first): B for full, F for initialize
        (times P, the layers, with brushes)."""
        B = self.steps * self.frame_buffer_size
        return {"none": 0, "self": 0, "full": B, "initialize": self.frame_buffer_size}[self.cfg_type] * self.layers

    @property
    def batch_rows(self) -> int:
        """Rows of the one UNet call per frame: B (none, self), 2B (full), B + F (initialize); each
        times P = active brushes + 1."""
        return self.steps * self.frame_buffer_size * self.layers + self.negative_rows

    @property
    def layers(self) -> int:
        """P: UNet rows per (stage, frame): the global prompt plus every active brush (regions.py)."""
        return self._regions.layers

    @property
    def regions(self) -> Regions:
        """The brushes, their masks and cover weights, for inspection; edit them through `update()`."""
        return self._regions

    @property
    def schedule(self) -> LcmSchedule:
        assert self._schedule is not None
        return self._schedule

    @property
    def stage_noise(self) -> torch.Tensor:
        """The fixed noises n_0 … n_{T−1}, (T, 4, h, w) float32 on the CPU (a copy)."""
        assert self._stage_noise is not None
        return self._stage_noise.clone()

    def __repr__(self) -> str:
        return (
            f"StreamEngine({self.width}x{self.height}, t_index_list={self.t_index_list}, "
            f"frame_buffer_size={self.frame_buffer_size}, cfg_type={self.cfg_type!r}, "
            f"batch_rows={self.batch_rows}, brushes={len(self._regions.active)}, device={self.device}, "
            f"dtype={self.dtype})"
        )

    @property
    def warm(self) -> bool:
        """False until the first frame after prepare() has filled the stream buffer."""
        return not self._cold

    # -- regional prompts (regions.py) ------------------------------------------------------

    def set_brush(self, index: int, **fields: Any) -> None:
        """Create or edit brush `index` in one step, e.g. set_brush(0, prompt="flames", rect=(0, 0, .5, .5))."""
        self.update(brush=(index, fields))

    def clear_brush(self, index: int) -> None:
        """Remove brush `index`."""
        self.update(brush=(index, "clear", None))

    def reorder_brushes(self, order: Sequence[int]) -> None:
        """New cover order, bottom first: every brush number once (later brushes cover earlier ones)."""
        self.update(brush_order=list(order))

    # -- live parameters -------------------------------------------------------------------

    def prepare(self, live: LiveParams | None = None, **changes: Any) -> None:
        """Set the parameters at once (no transition) and empty the stream.

        `live`: a whole set of live parameters (a snapshot from `live_params().params`, or a
        config's `stream.live`); default: the ones in force. `changes`: any `update()` keys,
        applied on top. The next frame (img2img or txt2img) fills the stream buffer by running
        the pipeline on itself (T − 1 extra UNet calls, once), so the very first output is
        already a fully denoised frame: equal to `reference(frame)`.
        """
        base = self._params if live is None else validated(LiveParams, live.model_dump())
        self._apply(changes, transition=False, base=base)
        self._cold = True
        self._transition = None
        self._settle = 0
        self._filter.reset()
        self._control.reset()
        self._last_image = None
        self._bank_tick = 0
        if self._bank is not None:
            self._bank.reset()
        self._smoother.reset()
        self._motion.reset()

    def update(self, **kwargs: Any) -> None:
        """Apply live parameters between frames; all are validated before any is applied.

        prompt / prompt_blend / negative_prompt / blend_method: blend from the current
            embeddings to the new ones over `prompt_transition_frames` processed frames.
        prompt_blend: [(text, weight), ...], mixed by `blend_method` ("linear" or "slerp").
        guidance_scale, delta: the next frame.
        t_index_list or strength (not both; strength keeps T, see schedule.strength_to_t_index),
        seed or seed_blend ([(seed, weight), ...]): the next frame re-noises every stage's last
            x0 estimate with the new schedule / noises; no UNet work is added and no
            half-denoised frame is returned. A change of T changes `batch_rows`.
        similarity_threshold (0 disables), similarity_max_skip, prompt_transition_frames.
        brush: (index, field, value) or (index, {field: value, ...}) edits, creates ("clear":
            removes) one brush (regions.FIELDS); only that brush is re-encoded / re-masked, and
            the stream is not flushed. A change in the number of active brushes changes
            `batch_rows`. brush_order: every brush number once, bottom first.
        lora: (index, field, value) or (index, {field: value, ...}) edits, creates ("clear":
            removes) one LoRA (live_params.LoraParams: source, weight, enabled), or a plan made by
            `prepare_lora()` off this thread. A new source is read here when not planned before.

        Raises ValueError (the engine unchanged) for an unknown key or a bad value.
        """
        if kwargs:
            self._apply(kwargs, transition=True)

    def _apply(self, kwargs: dict[str, Any], *, transition: bool, base: LiveParams | None = None) -> None:
        with torch.inference_mode():
            new, derived = self._validated(kwargs, self._params if base is None else base)
            self._commit(new, derived, transition=transition)

    def _validated(self, kwargs: dict[str, Any], base: LiveParams) -> tuple[LiveParams, dict[str, Any]]:
        """Check every value and compute what they feed (embeddings, schedule, noises); mutate nothing."""
        unknown = sorted(set(kwargs) - UPDATE_KEYS)
        if unknown:
            raise ValueError(f"unknown engine parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(UPDATE_KEYS))}")
        if "brush" in kwargs and "brush_order" in kwargs:
            raise ValueError("give brush or brush_order, not both")
        plain = {k: v for k, v in kwargs.items() if k not in ("brush", "brush_order", "lora", "controlnet")}
        new = base.apply(plain) if plain else base

        old = self._params
        derived: dict[str, Any] = {}
        if self._emb_current is None or (new.prompts, new.negative_prompt, new.blend_method) != (
            old.prompts, old.negative_prompt, old.blend_method
        ):
            derived["embeddings"] = self._embeddings_for(new)
        if self._schedule is None or new.t_index_list != old.t_index_list:
            derived["schedule"] = LcmSchedule.from_scheduler(self._scheduler, new.t_index_list)
        if self._stage_noise is None or new.seeds != old.seeds or new.steps != self.steps:
            derived["noise"] = self._noise_for(new.seeds, new.steps)
        if "brush" in kwargs:
            derived["brush"] = self._regions.check(*_indexed_fields(kwargs["brush"]))
        if "brush_order" in kwargs:
            derived["brush_order"] = self._regions.check_order(kwargs["brush_order"])
        if "lora" in kwargs:
            value = kwargs["lora"]
            derived["lora"] = value if isinstance(value, LoraPlan) else self.prepare_lora(value)
        if "controlnet" in kwargs:
            value = kwargs["controlnet"]
            derived["controlnet"] = value if isinstance(value, ControlPlan) else self.prepare_controlnet(value)
        return new, derived

    def _commit(self, new: LiveParams, derived: dict[str, Any], *, transition: bool) -> None:
        old, self._params = self._params, new
        self._filter.configure(new.similarity_threshold, new.similarity_max_skip)
        if "embeddings" in derived:
            target = derived["embeddings"]
            frames = new.prompt_transition_frames
            if transition and not self._cold and frames > 0 and self._emb_current is not None:
                self._transition = [self._emb_current, target, 0, frames]
            else:
                self._emb_current, self._transition = target, None
                self._rows_dirty = True
        if "noise" in derived:
            self._stage_noise = derived["noise"]
        if "schedule" in derived or "noise" in derived:
            self._build_layout(derived.get("schedule", self._schedule), old_steps=len(old.t_index_list))
        if "brush" in derived or "brush_order" in derived:
            # Only the edited brush was recomputed (check); the rows change size only when the
            # number of active brushes does. The carried x0 is one per (stage, frame): no flush.
            layers = self.layers
            if "brush" in derived:
                self._regions.commit(derived["brush"])
            else:
                self._regions.commit_order(derived["brush_order"])
            if self.layers != layers:
                self._build_rows()
            self._rows_dirty = True
        if "lora" in derived:
            self._commit_lora(derived["lora"])
        if "controlnet" in derived:
            self._control.commit(derived["controlnet"])
        self._configure_temporal(new)
        self._live = LiveState(params=new, brushes=self._regions.brushes, brush_order=self._regions.order,
                               loras=self._loras.params, controlnets=self._control.params)
        changed = {name for name in LiveParams.model_fields if getattr(old, name) != getattr(new, name)}
        if changed - _QUIET_FIELDS or {"brush", "brush_order", "lora", "controlnet"} & derived.keys():
            self._settle = max(self._settle, new.prompt_transition_frames + self.steps)
        if changed:
            logger.debug("engine parameters: %s", ", ".join(f"{k}={getattr(new, k)!r}" for k in sorted(changed)))

    # -- temporal consistency (feature_bank.py, smoothing.py) -------------------------------

    @property
    def feature_bank(self) -> FeatureBank | None:
        """The feature bank while it is on (its processors sit on the UNet), else None."""
        return self._bank

    def _configure_temporal(self, params: LiveParams) -> None:
        """Bring the bank and the smoother to the parameters in force (cheap when nothing changed)."""
        if not params.feature_bank:
            self._set_bank(None)
        elif self._bank is None:
            bank = FeatureBank(self.components.unet, self.latent_shape[1:])
            bank.install()
            self._set_bank(bank)
        if self._bank is not None:
            self._bank.configure(
                size=params.feature_bank_size, fusion=params.feature_fusion, threshold=params.feature_fusion_threshold
            )
            if not self._bank.storage():
                self._bank.reset(rows=self.batch_rows)  # switched on: storage for the rows in force
        self._smoother.configure(strength=params.smoothing, motion_aware=params.smoothing_motion)
        self._motion.configure(steps=params.steps)

    def _set_bank(self, bank: FeatureBank | None) -> None:
        if self._bank is not None and self._bank is not bank:
            self._bank.remove()  # off costs nothing: the UNet gets its own processors back
        self._bank = bank
        self._bank_tick = 0

    def _bank_rows(self, stage: int) -> torch.Tensor:
        """The stream call's rows that `reference()`'s call for `stage` evaluates, in its order:
        the stage's negative rows (full; initialize at stage 0), then its stream rows."""
        F, P = self.frame_buffer_size, self.layers
        n_neg = self.negative_rows
        stage_rows = torch.arange(stage * F * P, (stage + 1) * F * P)
        negative = self.cfg_type == "full" or (self.cfg_type == "initialize" and stage == 0)
        rows = torch.cat([stage_rows, stage_rows + n_neg]) if negative else stage_rows + n_neg
        return rows.to(self.device)

    # -- the LoRA stack (lora.py) -----------------------------------------------------------

    @property
    def loras(self) -> LoraStack:
        """The LoRA stack, for inspection; edit it through `update(lora=...)`."""
        return self._loras

    def lora_heavy(self, edit: Any) -> bool:
        """True when a LoRA edit has heavy work to do before it can be committed (a file to read,
        or merged weights to compute): the node plans those off the engine thread."""
        index, fields = _indexed_fields(edit, "lora")
        slot = self._loras.params.get(index) if isinstance(index, int) else None
        new_source = "source" in fields and (slot is None or fields["source"] != slot.source)
        return new_source or self._loras.mode == "merged"

    def prepare_lora(self, edit: Any) -> LoraPlan:
        """The heavy half of a LoRA edit ((index, field, value) or (index, {field: value, ...});
        field "clear" removes it): reads its file, computes concatenated factors or merged weights.
        Safe on any thread while frames run (it changes nothing); commit the plan on the engine
        thread with `update(lora=plan)`. Raises ValueError (lora.LoraError) with one line."""
        with torch.inference_mode():
            return self._loras.plan(*_indexed_fields(edit, "lora"))

    def _commit_lora(self, plan: LoraPlan) -> None:
        try:
            self._loras.commit(plan)
        except StalePlan:
            # Another LoRA edit came first: plan this one again on the stack in force, reusing
            # the file it read (only the concatenation or the merge is redone, here).
            plan = self._loras.replan(plan)
            self._loras.commit(plan)
        for listener in self._weight_listeners:
            listener(plan.structure)

    # -- ControlNets (controlnet.py) ---------------------------------------------------------

    @property
    def controlnets(self) -> ControlStack:
        """The ControlNets, for inspection; edit them through `update(controlnet=...)`."""
        return self._control

    def controlnet_heavy(self, edit: Any) -> bool:
        """True when a ControlNet edit brings a model to load: the node loads it off the engine thread."""
        return self._control.heavy(*_indexed_fields(edit, "controlnet"))

    def prepare_controlnet(self, edit: Any) -> ControlPlan:
        """The heavy half of a ControlNet edit ((index, field, value) or (index, {field: value, ...});
        field "clear" removes it): loads and checks a new model. Safe on any thread while frames
        run (it changes nothing); commit on the engine thread with `update(controlnet=plan)`.
        Raises ValueError (controlnet.ControlNetError) with one line."""
        with torch.inference_mode():
            return self._control.plan(*_indexed_fields(edit, "controlnet"))

    def set_control_map(self, index: int, image: Any, *, derived: bool = False) -> None:
        """The map of ControlNet `index` for the frames of the next calls, until another arrives
        (an external map source, or a preprocessor run off the engine thread). float (3, H, W) /
        (F, 3, H, W) in [0, 1] or uint8 (H, W[, 3]) / (F, H, W, 3) numpy at the engine's size.
        The similarity filter stands aside until the new map has reached the output, unless the
        map is `derived` from the input frame (a preprocessor's): then the frame says it all."""
        with torch.inference_mode():
            self._control.set_map(index, image)
        if not derived:
            self._settle = max(self._settle, self.steps)

    def _embeddings_for(self, params: LiveParams) -> torch.Tensor:
        """(2, L, D): [negative, blended positive] (packed, conditioning.py), every text served by the LRU cache."""
        texts = [params.negative_prompt, *(text for text, _ in params.prompts)]
        embs = self._prompts.get_many(texts)
        positive = blend_embeddings(embs[1:], [w for _, w in params.prompts], params.blend_method)
        negative = embs[0]
        if self._conditioning.negative_is_zero(params.negative_prompt):
            negative = torch.zeros_like(negative)  # SDXL: no negative prompt is zeros, not the encoding of ""
        return torch.cat([negative, positive]).to(self.device, self.dtype)

    def _noise_for(self, seed_blend: tuple[tuple[int, float], ...], steps: int) -> torch.Tensor:
        """Fixed noises n_0 … n_{T−1}: (T, 4, h, w) float32.

        Seed s: `torch.Generator("cpu").manual_seed(s)`, then one `torch.randn((4, h, w))`
        draw per stage, in stage order (so n_k does not depend on T, and the CPU and the GPU
        see the same noise). A seed blend is Σ wᵢ·nᵢ / sqrt(Σ wᵢ²): for independent noises that
        is again a standard normal, so a blend is as noisy as a single seed.
        """
        total = torch.zeros((steps, *self.latent_shape), dtype=torch.float32)
        for seed, weight in seed_blend:
            if weight == 0.0:
                continue
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            draws = [torch.randn(self.latent_shape, generator=generator, dtype=torch.float32) for _ in range(steps)]
            total += weight * torch.stack(draws)
        return total / math.sqrt(sum(w * w for _, w in seed_blend))

    def _build_layout(self, schedule: LcmSchedule, *, old_steps: int) -> None:
        """Per-row tensors for the current T, F and cfg_type; carried x0 / R remapped if T changed."""
        T, F = schedule.steps, self.frame_buffer_size
        B = T * F
        self._schedule = schedule

        def per_row(values: torch.Tensor) -> torch.Tensor:
            return values.repeat_interleave(F).view(B, 1, 1, 1).to(self.device, self.dtype)

        self._a = per_row(schedule.alpha)
        self._b = per_row(schedule.beta)
        self._c_skip = per_row(schedule.c_skip)
        self._c_out = per_row(schedule.c_out)
        self._a_over_b = per_row(schedule.alpha / schedule.beta)
        assert self._stage_noise is not None
        self._noise = self._stage_noise.repeat_interleave(F, dim=0).to(self.device, self.dtype)
        self._t_rows = schedule.timesteps.repeat_interleave(F).to(self.device)
        # Brush masks are quantized by the stage noise levels σ_k = b_k.
        self._regions.set_sigmas(schedule.beta.tolist())
        self._build_rows()
        if not self._cold and old_steps != schedule.steps and self._x0_prev is not None:
            # New stage k continues from old stage min(k, T_old − 1): the same frames, in order.
            index = torch.tensor([min(k, old_steps - 1) * F + f for k in range(T) for f in range(F)],
                                 device=self.device)
            self._x0_prev = self._x0_prev[index]
            if self._resid_prev is not None:
                self._resid_prev = self._resid_prev[index]
            self._control.remap_stages([min(k, old_steps - 1) for k in range(T)])

    def _build_rows(self) -> None:
        """The UNet call's tensors for T, F, cfg_type and P layers (reallocated when the row count changes)."""
        P, F = self.layers, self.frame_buffer_size
        B = self.steps * F
        n_neg, rows = self.negative_rows, self.batch_rows
        t_rows = self._t_rows.repeat_interleave(P) if P > 1 else self._t_rows
        # Negative rows come first and are the first n_neg stream rows again (all of them, or stage 0).
        self._unet_t = torch.cat([t_rows[:n_neg], t_rows])
        # The stage of every row (the ControlNets' guidance range is a range of stages).
        stage_rows = torch.arange(self.steps, device=self.device).repeat_interleave(F * P)
        self._unet_stage = torch.cat([stage_rows[:n_neg], stage_rows])
        # The stream position k·F + f of every row: the input motion its bank row forgets by.
        positions = torch.arange(B, device=self.device).repeat_interleave(P)
        self._row_positions = torch.cat([positions[:n_neg], positions])
        if getattr(self, "_unet_in", None) is None or self._unet_in.shape[0] != rows:
            self._unet_in = torch.zeros((rows, *self.latent_shape), device=self.device, dtype=self.dtype)
            self._unet_emb: torch.Tensor | None = None
            self._rows_dirty = True
        bank = getattr(self, "_bank", None)
        if bank is not None:
            bank.reset(rows=rows)  # the rows mean other frames / stages now
        if P == 1:
            self._x = self._unet_in[n_neg:]  # the B stream rows, a view: written in place every call
        else:
            # With brushes X is its own B rows, copied once per layer into the stream rows.
            self._x = torch.zeros((B, *self.latent_shape), device=self.device, dtype=self.dtype)

    # -- per-frame math (separable so regions can fuse x0 per brush before re-noising) -------

    def _by_layer(self, out: torch.Tensor) -> torch.Tensor:
        """UNet rows (…, layer fastest) → (P, rows / P, C, h, w), a view: row r of layer p is out[r·P + p]."""
        return out.unflatten(0, (-1, self.layers)).transpose(0, 1)

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """LCM step with boundary condition: x0 = c_out·(X − b·ε)/a + c_skip·X, per row.

        eps may carry a leading layer axis, (P, rows, C, h, w): the layers share X and the scalars.
        """
        a, b = self._a[rows], self._b[rows]
        return self._c_out[rows] * (x - b * eps) / a + self._c_skip[rows] * x

    def renoise(self, x0: torch.Tensor, rows: slice) -> torch.Tensor:
        """Forward diffusion with the fixed noise of the rows' stage: a·x0 + b·n."""
        return self._a[rows] * x0 + self._b[rows] * self._noise[rows]

    def _stock_noise(self, resid: torch.Tensor, rows: slice) -> torch.Tensor:
        """RCFG stock noise at the rows' stage from the previous stage's residual: s = n + (a/b)·R."""
        return self._noise[rows] + self._a_over_b[rows] * resid

    def _stock_residual(self, s: torch.Tensor, eps_hat: torch.Tensor, rows: slice) -> torch.Tensor:
        """R = c_out·b·(s − ε̂)/a + c_skip·b·s: the LCM step applied to the virtual latent b·s."""
        a, b = self._a[rows], self._b[rows]
        return self._c_out[rows] * b * (s - eps_hat) / a + self._c_skip[rows] * b * s

    def _guide(self, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        """ε̂ = ε_u + g·(ε_c − ε_u); g ≤ 1 means no guidance."""
        g = self._params.guidance_scale
        return eps_u + g * (eps_c - eps_u) if g > 1.0 else eps_c

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, stages: torch.Tensor,
        maps: Mapping[int, torch.Tensor] | None = None, *, bank_rows: torch.Tensor | None = None,
        record: bool = False,
    ) -> torch.Tensor:
        """One UNet evaluation through the swappable backend, as ε; with the ControlNets' residuals
        for these rows (their stages; `maps`: each net's map per row, default the stream rows).

        With the feature bank on, its processors attend to the bank rows of this call's rows
        (`bank_rows`; None: the stream call, every row) and, with `record`, keep this call's
        features for the bank (committed when the frame succeeds)."""
        self.stats["unet_calls"] += 1
        hidden, added = self._conditioning.unet_inputs(emb, height=self.height, width=self.width)
        kwargs: dict[str, Any] = {} if added is None else {"added_cond": added}
        if self._control.active(self.steps):
            control = self._control.residuals(x, t, hidden, added, stages, self.steps, maps=maps, reuse=maps is None)
            if control is not None:
                kwargs["control"] = control
        if self._bank is None:
            out = self.unet_call(x, t, hidden, **kwargs)
        else:
            # A stateless backend takes the bank as tensors (`banked`), at the stream's rows (so
            # `reference()`'s per-stage calls run eager); any other backend cannot see the bank's
            # processors, so the call runs on the eager UNet (logged once). The banked graph has
            # no residual inputs: a call with ControlNet residuals runs eager too.
            seam_banked = getattr(self.unet_call, "banked", False)
            banked = seam_banked and bank_rows is None and "control" not in kwargs
            call = self.unet_call
            if not banked and call is not self._eager_unet:
                call = self._eager_unet
                if not seam_banked and not self._bank_fallback_logged:
                    self._bank_fallback_logged = True
                    logger.warning("the feature bank runs on the PyTorch UNet: this backend does not take the bank")
            with self._bank.call(bank_rows, record=record, full=banked) as io:
                if banked:
                    kwargs["bank"] = io
                out = call(x, t, hidden, **kwargs)
        if self._prediction == "epsilon":
            return out
        a, b = self._sqrt_acp[t].view(-1, 1, 1, 1), self._sqrt_1m_acp[t].view(-1, 1, 1, 1)
        if self._prediction == "v_prediction":
            return a * out + b * x  # v = a·ε − b·x0 and X = a·x0 + b·ε give ε = a·v + b·X
        return (x - a * out) / b  # the model predicts x0

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        self.stats["vae_encodes"] += 1
        return self.vae_encode(image)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.stats["vae_decodes"] += 1
        # NHWC for the decoder too (a few KiB to reorder): faster convolutions, and the image
        # comes back already in H×W×3 order for the host.
        return self.vae_decode(latents.contiguous(memory_format=torch.channels_last))

    def _stream_step(self, x_new: torch.Tensor, *, record: bool = False) -> torch.Tensor:
        """One stream-batch step: F new stage-0 latents in, the F finished x0 (stage T−1) out.
        `record`: the feature bank keeps this call's features (committed by `_end_frame`)."""
        F, T, P = self.frame_buffer_size, self.steps, self.layers
        n_neg = self.negative_rows
        X = self._x
        later = slice(F, None)  # stages 1 … T−1
        rcfg = self.cfg_type in ("self", "initialize")
        assert self._x0_prev is not None

        # 1. Stack the stream batch. Stage 0: the new frames. Stage k ≥ 1: last call's x0 of
        #    stage k−1 re-noised with the fixed noise: X_k = a_k·x0_{k−1} + b_k·n_k.
        X[:F] = x_new
        if T > 1:
            X[later] = self.renoise(self._x0_prev[:-F], later)

        # 2. RCFG stock noise: stage 0 carries n_0 (the noise its latent was made with);
        #    stage k ≥ 1: s_k = n_k + (a_k/b_k)·R_{k−1}.
        s = None
        if rcfg:
            s = self._noise[:F]
            if T > 1:
                assert self._resid_prev is not None
                s = torch.cat([s, self._stock_noise(self._resid_prev[:-F], later)])

        # 3. Brushes: each (stage, frame) latent once per layer (global prompt, then the active
        #    brushes): stream row (k·F + f)·P + p = X_{k·F+f}. Without brushes X is the stream rows.
        stream_rows = self._unet_in[n_neg:]
        if P > 1:
            stream_rows.unflatten(0, (-1, P)).copy_(X.unsqueeze(1))

        # 4. Negative rows (before the stream rows): full repeats all of them, initialize stage 0.
        if n_neg:
            self._unet_in[:n_neg] = stream_rows[:n_neg]

        # 5. ONE UNet call over all batch_rows rows, with the ControlNets' residuals of every row
        #    (each row's map is the map of the frame it belongs to); with brushes, ε per layer.
        if self._control.active(T):
            self._control.stream_maps(T, F, P, n_neg)
        out = self._unet(self._unet_in, self._unet_t, self._unet_emb, self._unet_stage, record=record)
        eps_neg, eps_c = out[:n_neg], out[n_neg:]
        if P > 1:
            eps_neg, eps_c = self._by_layer(eps_neg), self._by_layer(eps_c)

        # 6. Guidance: ε̂ = ε_u + g·(ε_c − ε_u) with ε_u the real negative (full) or δ·s (self,
        #    initialize; initialize first replaces stage 0's s with the real negative ε, per layer).
        if self.cfg_type == "none":
            eps_hat = eps_c
        elif self.cfg_type == "full":
            eps_hat = self._guide(eps_c, eps_neg)
        else:
            if self.cfg_type == "initialize":
                rest = s[F:] if P == 1 else s[F:].expand(P, *s[F:].shape)  # type: ignore[index]
                s = torch.cat([eps_neg, rest], dim=0 if P == 1 else 1)
            eps_hat = self._guide(eps_c, self._params.delta * s)

        # 7. LCM step for every row: x0 = c_out·(X − b·ε̂)/a + c_skip·X (per layer with brushes).
        x0 = self.predict_x0(X, eps_hat)
        resid = self._stock_residual(s, eps_hat, slice(None)) if rcfg else None  # type: ignore[arg-type]

        # 8. Brushes: fuse the layers with each stage's cover weights, x0_k = Σ_p W_{p,k}·x0_{p,k}
        #    (R likewise): one x0 per (stage, frame) is carried and re-noised once (step 1).
        if P > 1:
            x0 = self._regions.fuse(x0, F)
            resid = None if resid is None else self._regions.fuse(resid, F)

        # 9. Carry x0 (and the RCFG residual R) to the next call, which re-noises them (step 1),
        #    and the ControlNet maps with their frames.
        self._resid_prev = resid
        self._x0_prev = x0
        self._control.advance(T)
        return x0[-F:]

    def _write_rows(self, emb: torch.Tensor) -> None:
        """(2, L, D) [negative, positive] → the (batch_rows, L, D) packed embeddings of the UNet call."""
        n_neg, rows, P = self.negative_rows, self.batch_rows, self.layers
        if self._unet_emb is None or self._unet_emb.shape[0] != rows:
            self._unet_emb = torch.empty((rows, *emb.shape[1:]), device=self.device, dtype=self.dtype)
        if P == 1:
            self._unet_emb[:n_neg] = emb[0]
            self._unet_emb[n_neg:] = emb[1]
            return
        # Brushes: row r holds layer r mod P (layer fastest), each mixed toward the global prompt.
        negative, positive = self._regions.layer_embeddings(emb)
        self._unet_emb[:n_neg].unflatten(0, (-1, P)).copy_(negative)
        self._unet_emb[n_neg:].unflatten(0, (-1, P)).copy_(positive)

    def _frame_embeddings(self) -> torch.Tensor:
        """This frame's [negative, positive] embeddings, one transition step further; rows written."""
        if self._transition is not None:
            start, target, done, total = self._transition
            emb = torch.lerp(start, target, (done + 1) / total)
            self._write_rows(emb)
            return emb
        assert self._emb_current is not None
        if self._rows_dirty or self._unet_emb is None:
            self._write_rows(self._emb_current)
            self._rows_dirty = False
        return self._emb_current

    def _end_frame(self, emb: torch.Tensor, image: torch.Tensor) -> None:
        """Commit what a successful frame changes (a failed frame leaves the engine as it was)."""
        if self._transition is not None:
            self._transition[2] += 1
            self._emb_current = emb
            if self._transition[2] >= self._transition[3]:
                self._emb_current = self._transition[1]
                self._transition = None
                self._rows_dirty = True
        self._settle = max(0, self._settle - 1)
        if self._bank is not None:
            self._bank.commit()
        self._bank_tick += 1
        self._last_image = image
        self.stats["frames"] += self.frame_buffer_size

    def _bank_records(self) -> bool:
        return self._bank is not None and self._bank_tick % self._params.feature_bank_interval == 0

    def _warm_fill(self, x_new: torch.Tensor, x0_init: torch.Tensor) -> None:
        """Cold start: run the pipeline T − 1 times on this frame before it counts.

        The buffer starts as this frame's own latent at every stage (zeros for txt2img); each
        silent stream step replaces one more stage with the real pipeline's state for this
        frame, so after T − 1 steps the buffer is what T − 1 earlier copies of this frame would
        have left, and this frame's output equals `reference(frame)`. Costs T − 1 UNet calls
        (at the normal batch shape), no VAE work.
        """
        T = self.steps
        self._x0_prev = x0_init.repeat(T, 1, 1, 1)
        self._resid_prev = torch.zeros_like(self._x0_prev) if self.cfg_type in ("self", "initialize") else None
        for _ in range(T - 1):
            self._stream_step(x_new)
        self._cold = False
        self.stats["warm_fills"] += 1
        logger.debug("stream buffer filled (%d silent steps)", T - 1)

    # -- frames in, frames out -------------------------------------------------------------

    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """img2img one call: F new frames in, F frames out (those that entered T − 1 calls ago).

        frame: uint8 RGB (H, W, 3) numpy or tensor ((F, H, W, 3) when F > 1), or a float tensor
        (3, H, W) / (F, 3, H, W) in [0, 1]. Returns the same kind, shape and (for tensors)
        device, always a new array the engine never touches again.
        """
        with torch.inference_mode():
            image, kind = self._preprocess(frame)
            F = self.frame_buffer_size
            # 1. Similarity filter: a skipped frame returns the last output, no UNet/VAE work.
            may_skip = self._settle == 0 and self._last_image is not None and not self._cold
            if self._filter.should_skip(image, allowed=may_skip):
                self.stats["skipped"] += F
                self.stats["frames"] += F
                last = self._last_image
            else:
                last = self._process(image)
        # Outside inference mode: the caller gets an ordinary tensor it may edit in place.
        return self._postprocess(last, kind)

    def _process(self, image: torch.Tensor) -> torch.Tensor:
        """Steps 2–9 of a processed frame; on failure the filter forgets it and nothing is committed."""
        F = self.frame_buffer_size
        try:
            # 2. Encode: z = s·E(I); the ControlNet maps of the new frames.
            z = self._encode(image)
            self._control.begin(image, F)
            # 3. Noise to stage 0 with the fixed noise: X_0 = a_0·z + b_0·n_0.
            x_new = self.renoise(z, slice(0, F))
            # 4. This frame's prompt embeddings (a prompt transition steps here).
            emb = self._frame_embeddings()
            # 5. The input's motion, kept while its frames are in the stream (only while the bank
            #    or motion-aware smoothing is on): the bank forgets, in each row, the tokens whose
            #    area moved in that row's frame (stage k's frame entered k calls ago).
            if self._bank is not None or self._smoother.wants_motion:
                self._motion.observe(image)
                if self._bank is not None:
                    self._bank.forget(self._motion.of_rows(self._row_positions))
            else:
                self._motion.reset()
            # 6. Cold stream: fill it from this frame (T − 1 silent steps, once).
            if self._cold:
                self._warm_fill(x_new, z)
            # 7. One stream-batch step → x0 of the frames that leave (the bank records every
            #    interval-th processed call).
            x0 = self._stream_step(x_new, record=self._bank_records())
            # 8. Smoothing (when on): blend with the last output where the leaving frames' input
            #    stood still.
            if self._smoother.active:
                x0 = self._smoother(x0, motion=self._motion.of_stage(self.steps - 1))
            # 9. Decode.
            image_out = self._decode(x0)
        except BaseException:
            self._filter.reset()
            if self._bank is not None:
                self._bank.discard()
            raise
        self._end_frame(emb, image_out)
        return image_out

    def txt2img(self, *, output_type: Literal["np", "pt"] = "np") -> np.ndarray | torch.Tensor:
        """One call with no input frame: stage 0 starts from the fixed noise n_0 itself.

        The noises are fixed, so for fixed parameters the output is a still image; prompt,
        seed and seed_blend changes move it (smoothly, with prompt transitions and blends).
        Returns uint8 (H, W, 3) ("np") or float (3, H, W) in [0, 1] on the device ("pt");
        with a leading F axis when F > 1.
        """
        kind = self._txt2img_kind(output_type)
        with torch.inference_mode():
            F = self.frame_buffer_size
            # 1. Stage 0 is pure (fixed) noise: X_0 = n_0.
            x_new = self._noise[:F]
            # 2. Embeddings (and ControlNet maps from outside), 3. cold fill from zeros,
            #    4. one stream step, 5. decode.
            emb = self._frame_embeddings()
            self._control.begin(None, F)
            if self._cold:
                self._warm_fill(x_new, torch.zeros_like(x_new))
            x0 = self._stream_step(x_new, record=self._bank_records())
            if self._smoother.active:
                x0 = self._smoother(x0, motion=None)  # no input: α everywhere
            self._motion.reset()  # the next input frame has no earlier one to move from
            image = self._decode(x0)
            self._end_frame(emb, image)
        return self._postprocess(image, kind)

    def reference(
        self, frame: np.ndarray | torch.Tensor | None = None, *, output_type: Literal["np", "pt"] = "np"
    ) -> np.ndarray | torch.Tensor:
        """The same T steps one after another on this frame alone (txt2img when frame is None).

        Same noises, schedule, embeddings (the current ones) and RCFG recurrence as the stream;
        the UNet runs once per stage on F rows (2F for full, and for initialize's stage 0).
        Leaves the stream state untouched. After warm-up, the stream fed the same frame
        repeatedly returns exactly this. `output_type` applies when frame is None. With brushes
        each stage runs its F rows once per layer and fuses them with that stage's weights.
        """
        with torch.inference_mode():
            F, T, P = self.frame_buffer_size, self.steps, self.layers
            if frame is None:
                kind = self._txt2img_kind(output_type)
                x = self._noise[:F]
                self._control.begin(None, F)
            else:
                image, kind = self._preprocess(frame)
                x = self.renoise(self._encode(image), slice(0, F))
                self._control.begin(image, F)
            assert self._emb_current is not None
            if P == 1:
                emb_neg = self._emb_current[0:1].expand(F, -1, -1)
                emb_pos = self._emb_current[1:2].expand(F, -1, -1)
            else:
                # Frame, then layer: the stream's row order within a stage.
                negative, positive = self._regions.layer_embeddings(self._emb_current)
                emb_neg, emb_pos = negative.repeat(F, 1, 1), positive.repeat(F, 1, 1)
            rcfg = self.cfg_type in ("self", "initialize")
            s = self._noise[:F] if rcfg else None
            x0 = x
            for k in range(T):
                rows = slice(k * F, (k + 1) * F)
                t = self._t_rows[rows]
                xs, ts = (x, t) if P == 1 else (x.repeat_interleave(P, 0), t.repeat_interleave(P))
                # One UNet call for stage k (with the negative rows where the stream has them);
                # every row's ControlNet map is this frame's. The feature bank (when on) is read,
                # not written: the stage's rows of the stream's bank.
                negative = self.cfg_type == "full" or (self.cfg_type == "initialize" and k == 0)
                maps = self._control.frame_row_maps(layers=P, copies=2 if negative else 1)
                stages = torch.full((xs.shape[0] * (2 if negative else 1),), k, device=self.device)
                bank_rows = self._bank_rows(k) if self._bank is not None else None
                if negative:
                    out = self._unet(
                        torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([emb_neg, emb_pos]), stages, maps,
                        bank_rows=bank_rows,
                    )
                    eps_neg, eps_c = out[: F * P], out[F * P :]
                else:
                    eps_neg, eps_c = None, self._unet(xs, ts, emb_pos.contiguous(), stages, maps, bank_rows=bank_rows)
                if P > 1:
                    eps_c = self._by_layer(eps_c)
                    eps_neg = None if eps_neg is None else self._by_layer(eps_neg)
                if self.cfg_type == "none":
                    eps_hat = eps_c
                elif self.cfg_type == "full":
                    eps_hat = self._guide(eps_c, eps_neg)  # type: ignore[arg-type]
                else:
                    if eps_neg is not None:
                        s = eps_neg
                    eps_hat = self._guide(eps_c, self._params.delta * s)  # type: ignore[operator]
                x0 = self.predict_x0(x, eps_hat, rows)
                resid = self._stock_residual(s, eps_hat, rows) if rcfg and k < T - 1 else None  # type: ignore[arg-type]
                if P > 1:
                    stage = slice(k, k + 1)
                    x0 = self._regions.fuse(x0, F, stage)
                    resid = None if resid is None else self._regions.fuse(resid, F, stage)
                if k < T - 1:
                    following = slice((k + 1) * F, (k + 2) * F)
                    if resid is not None:
                        s = self._stock_noise(resid, following)
                    x = self.renoise(x0, following)
            image = self._decode(x0)
        return self._postprocess(image, kind)

    # -- conversion at the edge ------------------------------------------------------------

    def _txt2img_kind(self, output_type: str) -> _Kind:
        if output_type == "np":
            return _Kind("np", self.frame_buffer_size > 1)
        if output_type == "pt":
            return _Kind("float", self.frame_buffer_size > 1, self.device, self.dtype)
        raise ValueError(f"output_type = {output_type!r}: must be 'np' or 'pt'")

    def _check_shape(self, shape: tuple[int, ...], channels_last: bool) -> bool:
        """True if batched (leading F axis). Raises a ValueError that says how to fix the frame."""
        F, H, W = self.frame_buffer_size, self.height, self.width
        expected = (H, W, 3) if channels_last else (3, H, W)
        layout = "H×W×3 RGB" if channels_last else "3×H×W RGB"
        if len(shape) == 3 and F == 1:
            body, batched = shape, False
        elif len(shape) == 4:
            if shape[0] != F:
                raise ValueError(f"got {shape[0]} frames stacked; frame_buffer_size is {F}: pass {(F, *expected)}")
            body, batched = shape[1:], True
        elif len(shape) == 3:
            raise ValueError(f"frame_buffer_size is {F}: pass {F} frames stacked as {(F, *expected)}")
        else:
            raise ValueError(f"frame shape {tuple(shape)}: expected {layout} {expected}")
        channels = body[2] if channels_last else body[0]
        size = (body[0], body[1]) if channels_last else (body[1], body[2])
        if channels != 3:
            raise ValueError(
                f"frame has {channels} channels; frames are {layout} (drop alpha / convert BGR(A) to RGB "
                "where the frame is captured)"
            )
        if size != (H, W):
            raise ValueError(
                f"frame is {size[1]}×{size[0]}, the engine runs at {W}×{H}: resize it first "
                "(the node's source.fit does) or build the engine at that size"
            )
        return batched

    def _preprocess(self, frame: Any) -> tuple[torch.Tensor, _Kind]:
        """Caller's frame → (F, 3, H, W) in [-1, 1] in the preallocated input tensor."""
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8:
                raise ValueError(
                    f"frame dtype is {frame.dtype}; numpy frames are uint8 RGB "
                    "(for floats in [0, 1]: (x * 255).round().astype(np.uint8))"
                )
            batched = self._check_shape(frame.shape, channels_last=True)
            array = frame if batched else frame[None]
            if self._pinned is not None and self._u8 is not None:
                np.copyto(self._pinned.numpy(), array)
                u8 = self._u8.copy_(self._pinned, non_blocking=True)
            else:
                u8 = torch.from_numpy(np.ascontiguousarray(array))
            kind = _Kind("np", batched)
        elif isinstance(frame, torch.Tensor):
            if frame.dtype == torch.uint8:
                batched = self._check_shape(tuple(frame.shape), channels_last=True)
                u8 = (frame if batched else frame[None]).to(self.device)
                kind = _Kind("u8", batched, frame.device)
            elif frame.is_floating_point():
                batched = self._check_shape(tuple(frame.shape), channels_last=False)
                lo, hi = (float(v) for v in torch.aminmax(frame.detach()))
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_FLOAT_FRAME_SLACK or hi > 1 + _FLOAT_FRAME_SLACK:
                    raise ValueError(f"float frames are RGB in [0, 1]; this one spans [{lo:.4g}, {hi:.4g}]")
                kind = _Kind("float", batched, frame.device, frame.dtype)
                # 2·x − 1: [0, 1] → [-1, 1], the VAE's range.
                self._img.copy_(frame if batched else frame[None]).mul_(2.0).sub_(1.0)
                return self._img, kind
            else:
                raise ValueError(f"frame tensor dtype {frame.dtype}: give uint8 (H, W, 3) or float (3, H, W) in [0, 1]")
        else:
            raise ValueError(f"frame must be a numpy array or a torch tensor, not {type(frame).__name__}")
        # (2/255)·x − 1: uint8 → [-1, 1] and HWC → CHW in one pass, into the preallocated input.
        torch.add(self._minus_one, u8.permute(0, 3, 1, 2), alpha=2.0 / 255.0, out=self._img)
        return self._img, kind

    def _postprocess(self, image: torch.Tensor, kind: _Kind) -> np.ndarray | torch.Tensor:
        """(F, 3, H, W) in [-1, 1] → the caller's kind; always a new array or tensor."""
        if kind.container == "float":
            out = ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0).to(device=kind.device, dtype=kind.dtype)
            return out if kind.batched else out[0]
        # Levels 127.5·x + 128 = (x + 1)·127.5 + 0.5: the uint8 cast truncates, so + 0.5 rounds.
        levels = torch.add(self._level_offset, image, alpha=127.5, out=self._levels).clamp_(0.0, 255.0)
        hwc = levels.permute(0, 2, 3, 1)  # a view; channels-last memory makes it C-contiguous
        if kind.container == "np":
            if self.device.type == "cpu":
                host = hwc.numpy().astype(np.uint8)  # a new array; numpy's cast is vectorised
            else:
                host = hwc.to(torch.uint8).cpu().numpy()  # cast on the GPU, then one small copy
            return host if kind.batched else host[0]
        out = hwc.to(device=kind.device, dtype=torch.uint8, copy=True)
        return out if kind.batched else out[0]


def _encode_texts(components: Any, stats: dict[str, int], texts: list[str]) -> torch.Tensor:
    """The prompt cache's encoder for an engine on `components` (models.ModelComponents), counting
    into its `stats`."""
    stats["text_encodes"] += len(texts)
    emb = components.encode_text(texts)
    if emb.shape[-1] != components.cross_attention_dim:
        raise ValueError(
            f"text encoder gives width {emb.shape[-1]}, the UNet cross-attends over "
            f"{components.cross_attention_dim}: the text encoder does not belong to this UNet"
        )
    return emb
