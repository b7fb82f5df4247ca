"""Shape ranges an accelerated engine must accept: batch rows and resolutions.

One profile covers everything a preset can ask for at run time, so that changing the
resolution (within the range), the number of steps (up to the preset's) or the cfg mode never
forces a rebuild. The UNet rows per call for T steps and F frames are:

    cfg none → T·F     full → 2·T·F     self → T·F     initialize → T·F + F

so `max_batch = 2·T·F` (full cfg) covers every mode at T steps or fewer. The VAE sees the F
frames of one call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CFG_TYPES = ("none", "full", "self", "initialize")
DEFAULT_MIN_SIZE = 256
DEFAULT_MAX_SIZE = 1024
SIZE_MULTIPLE = 64
"""The SD UNet halves the latent three times; pixels must be divisible by 8 · 8."""


class ProfileError(ValueError):
    """A stream shape outside what an engine profile allows; the message names the setting to change."""


def unet_rows(cfg_type: str, steps: int, frames: int) -> int:
    """UNet rows per stream-batch call (DESIGN.md, residual CFG)."""
    if cfg_type not in CFG_TYPES:
        raise ValueError(f"cfg_type {cfg_type!r} is not one of {', '.join(CFG_TYPES)}")
    if steps < 1 or frames < 1:
        raise ValueError(f"steps ({steps}) and frames ({frames}) must be at least 1")
    base = steps * frames
    return {"none": base, "full": 2 * base, "self": base, "initialize": base + frames}[cfg_type]


@dataclass(frozen=True)
class EngineProfile:
    """Batch and spatial ranges (pixels) for the UNet and the VAE; `opt_*` is what TensorRT tunes for.

    Whether a cached engine can serve a stream is decided by `covers()`, which ignores the
    `opt_*` values: they only steer kernel choice, never correctness.
    """

    min_batch: int
    opt_batch: int
    max_batch: int
    vae_max_batch: int
    min_size: int
    max_size: int
    opt_height: int
    opt_width: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ProfileError(f"batch range {self.min_batch}..{self.opt_batch}..{self.max_batch} is not ordered")
        if self.vae_max_batch < 1:
            raise ProfileError("vae_max_batch must be at least 1")
        if not self.min_size <= min(self.opt_height, self.opt_width):
            raise ProfileError(f"optimal size {self.opt_width}x{self.opt_height} is below min_size {self.min_size}")
        if not max(self.opt_height, self.opt_width) <= self.max_size:
            raise ProfileError(f"optimal size {self.opt_width}x{self.opt_height} is above max_size {self.max_size}")
        for name in ("min_size", "max_size", "opt_height", "opt_width"):
            if getattr(self, name) % SIZE_MULTIPLE:
                raise ProfileError(f"{name} = {getattr(self, name)} must be a multiple of {SIZE_MULTIPLE}")

    def covers(self, need: EngineProfile) -> bool:
        """True when every shape `need` allows is also allowed here."""
        return (
            self.min_batch <= need.min_batch
            and self.max_batch >= need.max_batch
            and self.vae_max_batch >= need.vae_max_batch
            and self.min_size <= need.min_size
            and self.max_size >= need.max_size
        )

    def accepts_size(self, height: int, width: int) -> str | None:
        """None when a height×width image fits this profile; otherwise why not, with the fix."""
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            return (
                f"{width}x{height} is not a multiple of {SIZE_MULTIPLE} in both sides, which TensorRT "
                f"engines need (e.g. {_round(width)}x{_round(height)})"
            )
        if not (self.min_size <= height <= self.max_size and self.min_size <= width <= self.max_size):
            return (
                f"{width}x{height} is outside the engine range {self.min_size}..{self.max_size}; "
                f"widen it with --set model.engine_min_size=… / model.engine_max_size=…"
            )
        return None

    def latent_range(self, scale: int = 8) -> tuple[int, int, int, int]:
        """(min, opt_h, opt_w, max) latent sides for a VAE with `scale` pixels per latent cell."""
        return (self.min_size // scale, self.opt_height // scale, self.opt_width // scale, self.max_size // scale)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineProfile:
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})


def _round(v: int) -> int:
    return max(SIZE_MULTIPLE, round(v / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def _clamp(v: int, lo: int, hi: int) -> int:
    return min(max(_round(v), lo), hi)


def profile_for(
    *,
    steps: int,
    frames: int,
    width: int,
    height: int,
    cfg_type: str = "self",
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    max_batch: int | None = None,
) -> EngineProfile:
    """The profile a stream of `steps` steps and `frames` frames per call needs.

    `max_batch` defaults to 2·steps·frames, so every cfg mode (and fewer steps) runs on the same
    engine; the optimal batch is the rows of the configured cfg mode.
    """
    widest = max(unet_rows(c, steps, frames) for c in CFG_TYPES)
    top = max_batch if max_batch is not None else widest
    opt = min(unet_rows(cfg_type, steps, frames), top)
    if top < unet_rows(cfg_type, steps, frames):
        raise ProfileError(
            f"engine_max_batch {top} is below the {unet_rows(cfg_type, steps, frames)} UNet rows that "
            f"cfg_type={cfg_type} with {steps} steps and frame_buffer_size {frames} need"
        )
    return EngineProfile(
        min_batch=1,
        opt_batch=opt,
        max_batch=top,
        vae_max_batch=frames,
        min_size=min_size,
        max_size=max_size,
        opt_height=_clamp(height, min_size, max_size),
        opt_width=_clamp(width, min_size, max_size),
    )


def profile_for_config(config: Any) -> EngineProfile:
    """The profile for a `NodeConfig` (what `streamnode build-engines --preset X` builds)."""
    stream, model = config.stream, config.model
    # `strength` keeps T = len(t_index_list) and only picks the indices (StreamEngine).
    return profile_for(
        steps=len(stream.t_index_list),
        frames=stream.frame_buffer_size,
        width=stream.width,
        height=stream.height,
        cfg_type=stream.cfg_type,
        min_size=model.engine_min_size,
        max_size=model.engine_max_size,
        max_batch=model.engine_max_batch,
    )


def profile_for_engine(
    engine: Any,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    max_batch: int | None = None,
) -> EngineProfile:
    """The profile a live `StreamEngine` needs (same rule as `profile_for_config`)."""
    return profile_for(
        steps=len(engine.t_index_list),
        frames=int(engine.frame_buffer_size),
        width=int(engine.width),
        height=int(engine.height),
        cfg_type=str(engine.cfg_type),
        min_size=min_size,
        max_size=max_size,
        max_batch=max_batch,
    )
