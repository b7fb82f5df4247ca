"""The live parameters: the one schema of every value that changes while the node streams.

Each field below carries its type, range, default, help text and OSC address. Everything else
is derived from here (docs/architecture.md, "How to add a live parameter"):

- `config.StreamConfig` and `config.BrushConfig` inherit these fields (presets, `--set`);
- the engine validates `update()` with `LiveParams.apply()` and reports what is in force as a
  `LiveState` snapshot (`Engine.live_params()`), which the node replays onto a new engine;
- the OSC address table, OSCQuery, docs/osc.md and the TouchDesigner parameter page
  (control/osc.py, touchdesigner/generate.py) read the addresses, types and ranges.

Some fields stand for the same state and replace each other (`EXCLUSIVE`): the prompt or a
weighted prompt blend, the seed or a seed blend, a t_index_list or the img2img strength that
picks one. In a snapshot exactly one member of a pair is in force; the other is None (for
strength/t_index_list, t_index_list always holds the indices in force and strength says
whether a strength chose them).

A leaf module: it imports nothing from streamnode, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

NUM_TRAIN_TIMESTEPS_LCM = 50
"""t_index values address the LCM schedule of 50 train-spaced steps (DESIGN.md)."""
MAX_TEXT = 4096
"""Longest prompt accepted (CLIP reads 77 tokens; the rest is truncated by the tokenizer)."""
MAX_BLEND = 8
"""Most (prompt, weight) or (seed, weight) pairs in one blend."""
MAX_STEPS = 8
"""Most denoising stages (len(t_index_list))."""
MAX_BRUSHES = 32
"""Upper bound of `runtime.max_brushes`."""
MAX_LORAS = 16
"""Upper bound of `runtime.max_loras`."""
MAX_CONTROLNETS = 8
"""Upper bound of `runtime.max_controlnets`."""
MAX_LFOS = 16
"""Upper bound of `runtime.max_lfos`."""
MAX_CUES = 64
"""Upper bound of `runtime.max_cues`."""
QUANTIZE_MODES = ("off", "beat", "bar", "2bars", "4bars", "8bars")
"""The grids a quantized change waits for (tempo/quantize.py)."""
LFO_SHAPES = ("sine", "triangle", "saw", "square", "random", "envelope")
"""LFO waveforms (tempo/lfo.py)."""
MAX_SEED = 2**32 - 1
MAX_BANK = 8
"""Most earlier frames the feature bank keeps per stage (docs/temporal.md)."""
MAX_SMOOTHING = 0.95
"""Strongest output smoothing: at 1 the output would never change."""


class _Frozen(BaseModel):
    # NaN/inf fail before range checks with "finite number": an OSC fader sending nan must not pass.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def osc(address: str, **extra: Any) -> dict[str, Any]:
    """A field's OSC metadata (`json_schema_extra`): its address, plus `arg_names` for multi-value
    arguments (`x y w h`) where the type alone does not name them."""
    return {"osc": address, **extra}


def _increasing(v: tuple[int, ...]) -> tuple[int, ...]:
    if any(b <= a for a, b in zip(v[:-1], v[1:], strict=True)):
        raise ValueError("indices must be strictly increasing, e.g. [32, 45]")
    return v


def _weights_positive(pairs: tuple[tuple[Any, float], ...]) -> tuple[tuple[Any, float], ...]:
    if sum(w for _, w in pairs) <= 0.0:
        raise ValueError("the weights must not all be 0")
    return pairs


def _png(v: str) -> str:
    if not v.lower().endswith(".png"):
        raise ValueError("must be a .png file path (shared-memory masks go in `shm`)")
    return v


def _shm_uri(v: str) -> str:
    name, _, query = v.removeprefix("shm://").partition("?")
    plane = query.removeprefix("plane=")
    if not v.startswith("shm://") or not name or (query and not (query.startswith("plane=") and plane.isdigit())):
        raise ValueError("must be shm://NAME or shm://NAME?plane=K, e.g. shm://sn_masks")
    return v


# Every rule of a field lives in its type, so one field can be checked alone (`check_field`: the
# OSC edge) exactly as the whole model checks it.
Text = Annotated[str, Field(max_length=MAX_TEXT, title="prompt")]
Weight = Annotated[float, Field(ge=0.0, le=1.0, title="weight")]
SeedValue = Annotated[int, Field(ge=0, le=MAX_SEED, title="seed")]
TIndex = Annotated[int, Field(ge=0, le=NUM_TRAIN_TIMESTEPS_LCM - 1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Indices = Annotated[tuple[TIndex, ...], AfterValidator(_increasing)]
PromptBlend = Annotated[tuple[tuple[Text, Weight], ...], AfterValidator(_weights_positive)]
SeedBlend = Annotated[tuple[tuple[SeedValue, Weight], ...], AfterValidator(_weights_positive)]
PngPath = Annotated[str, AfterValidator(_png)]
ShmUri = Annotated[str, AfterValidator(_shm_uri)]


def strength_to_t_index(strength: float, steps: int) -> list[int]:
    """`strength` in [0, 1] and T steps → the t_index_list of the same timesteps diffusers picks.

    It is the img2img meaning of strength: the fraction of the 50-step schedule the frame goes
    through. With L = floor(50·strength) (at least T), the indices are

        t_index_i = 50 − L + floor(i·L / T),   i = 0..T−1

    which are exactly the timesteps of `LCMScheduler.set_timesteps(T, strength=strength)`.
    strength 1 starts from pure noise (index 0, the input is ignored); strength 0.36 with T = 2
    gives [32, 41]; a strength below T/50 clamps to the gentlest schedule [50 − T, …, 49].
    """
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength = {strength!r} is not valid: must be a number in 0..1")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS_LCM:
        raise ValueError(f"steps = {steps}: must be in 1..{NUM_TRAIN_TIMESTEPS_LCM}")
    n = NUM_TRAIN_TIMESTEPS_LCM
    # The epsilon keeps 0.58·50 = 28.999… from flooring to 28.
    span = max(steps, math.floor(n * strength + 1e-9))
    return [n - span + (i * span) // steps for i in range(steps)]


def t_index_to_strength(t_index_list: list[int] | tuple[int, ...]) -> float:
    """The strength whose schedule starts at t_index_list[0]: (50 − t_index_list[0]) / 50."""
    return (NUM_TRAIN_TIMESTEPS_LCM - int(t_index_list[0])) / NUM_TRAIN_TIMESTEPS_LCM


def _no_bools(value: Any, info: Any) -> Any:
    # pydantic reads True as 1; a toggle sent where a number belongs is a mistake worth naming.
    if isinstance(value, bool):
        raise ValueError(f"{info.field_name} is a number, not {value}")
    return value


class LiveParams(_Frozen):
    """The engine's live parameters: what `update()` takes and a `LiveState` reports in force."""

    prompt: str | None = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/prompt"),
        description="Positive prompt; blends in over prompt_transition_frames frames.",
    )
    prompt_blend: PromptBlend | None = Field(
        None, min_length=1, max_length=MAX_BLEND, json_schema_extra=osc("/prompt_blend"),
        description="Weighted mix of prompts (replaces the prompt): prompt weight prompt weight …",
    )
    blend_method: Literal["linear", "slerp"] = Field(
        "linear", json_schema_extra=osc("/blend_method"),
        description="How a prompt blend mixes the embeddings: linear or slerp.",
    )
    negative_prompt: str = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/negative_prompt"),
        description="Negative prompt (used when cfg_type is full or initialize).",
    )
    prompt_transition_frames: int = Field(
        4, ge=0, le=600, json_schema_extra=osc("/prompt_transition"),
        description="Frames over which a prompt change blends in (0 = at once).",
    )
    guidance_scale: float = Field(
        1.2, ge=0.0, le=20.0, json_schema_extra=osc("/guidance"),
        description="Guidance scale g (≤ 1 means no guidance).",
    )
    delta: float = Field(1.0, ge=0.0, le=5.0, json_schema_extra=osc("/delta"), description="Residual CFG delta.")
    t_index_list: Indices = Field(
        (32, 45), min_length=1, max_length=MAX_STEPS, json_schema_extra=osc("/t_index"),
        description="Denoising steps as LCM schedule indices, strictly increasing; refreshes the stream buffer.",
    )
    strength: float | None = Field(
        None, ge=0.0, le=1.0, json_schema_extra=osc("/strength"),
        description="img2img strength: picks the t_index_list for the same number of steps "
        "(0 keeps the input, 1 ignores it).",
    )
    seed: int | None = Field(
        2, ge=0, le=MAX_SEED, json_schema_extra=osc("/seed"),
        description="Noise seed; refreshes the stream buffer. Above 2147483647 send h (int64) or d.",
    )
    seed_blend: SeedBlend | None = Field(
        None, min_length=1, max_length=MAX_BLEND, json_schema_extra=osc("/seed_blend"),
        description="Weighted mix of seeds' noises (replaces the seed): seed weight …",
    )
    similarity_threshold: float = Field(
        0.98, ge=0.0, le=1.0, json_schema_extra=osc("/similarity"),
        description="Similarity filter threshold: skip frames this similar to the last one (0 disables).",
    )
    similarity_max_skip: int = Field(
        10, ge=0, le=1000, json_schema_extra=osc("/similarity_max_skip"),
        description="Most frames skipped in a row by the similarity filter.",
    )

    # Temporal consistency (docs/temporal.md): the feature bank and the output smoothing.
    feature_bank: bool = Field(
        False, json_schema_extra=osc("/feature_bank"),
        description="1: the UNet's self-attention also attends to features of earlier frames (less flicker); "
        "0: off, costs nothing.",
    )
    feature_bank_size: int = Field(
        4, ge=1, le=MAX_BANK, json_schema_extra=osc("/feature_bank_size"),
        description="Earlier frames the feature bank keeps per stage.",
    )
    feature_bank_interval: int = Field(
        4, ge=1, le=600, json_schema_extra=osc("/feature_bank_interval"),
        description="Frames between two updates of the feature bank.",
    )
    feature_fusion: float = Field(
        0.8, ge=0.0, le=1.0, json_schema_extra=osc("/feature_fusion"),
        description="How much of the most similar banked feature replaces a new one (0: no fusion).",
    )
    feature_fusion_threshold: float = Field(
        0.98, ge=0.0, le=1.0, json_schema_extra=osc("/feature_fusion_threshold"),
        description="Cosine similarity above which a banked feature is fused.",
    )
    smoothing: float = Field(
        0.0, ge=0.0, le=MAX_SMOOTHING, json_schema_extra=osc("/smoothing"),
        description="Exponential blend of each output with the previous one (0: off).",
    )
    smoothing_motion: bool = Field(
        True, json_schema_extra=osc("/smoothing_motion"),
        description="1: smoothing stands aside where the input changes, so movement does not smear.",
    )

    _check_ints = field_validator(
        "prompt_transition_frames", "seed", "similarity_max_skip", "feature_bank_size", "feature_bank_interval",
        mode="before",
    )(_no_bools)

    @model_validator(mode="before")
    @classmethod
    def _one_of_each_pair(cls, data: Any) -> Any:
        """Given together, the members of a pair conflict; given alone, one replaces the other."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for a, b in (("prompt", "prompt_blend"), ("seed", "seed_blend")):
            if data.get(b) is not None:
                if data.get(a) not in (None, cls.model_fields[a].default):
                    raise ValueError(f"give {a} or {b}, not both")
                data[a] = None
            elif data.get(a, cls.model_fields[a].default) is None:
                data[a] = cls.model_fields[a].default  # neither: the default single value
        return data

    @model_validator(mode="after")
    def _derived(self) -> LiveParams:
        if self.strength is not None:
            # strength keeps T = len(t_index_list) and picks the indices.
            indices = tuple(strength_to_t_index(self.strength, len(self.t_index_list)))
            if indices != self.t_index_list:
                object.__setattr__(self, "t_index_list", indices)
        return self

    # -- what is in force

    @property
    def prompts(self) -> tuple[tuple[str, float], ...]:
        """The prompts in force with their weights: the blend, or the one prompt at weight 1."""
        return self.prompt_blend if self.prompt_blend is not None else ((self.prompt or "", 1.0),)

    @property
    def seeds(self) -> tuple[tuple[int, float], ...]:
        """The seeds in force with their weights: the blend, or the one seed at weight 1."""
        return self.seed_blend if self.seed_blend is not None else ((int(self.seed or 0), 1.0),)

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    # -- changes

    def apply(self, changes: Mapping[str, Any]) -> LiveParams:
        """These parameters with `changes` applied: validated, replacements resolved.

        A member of a pair replaces the other (`prompt_blend` clears `prompt`, `t_index_list`
        clears `strength`); both members in one change conflict. Raises ValueError, one line per
        problem, naming the parameter, the value and what is allowed.
        """
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ValueError(
                f"unknown live parameter(s) {', '.join(unknown)}; known: {', '.join(type(self).model_fields)}"
            )
        for a, b in EXCLUSIVE:
            if changes.get(a) is not None and changes.get(b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        data = self.model_dump()
        data.update(changes)
        for a, b in (("prompt", "prompt_blend"), ("seed", "seed_blend")):
            if changes.get(a) is not None:
                data[b] = None
            elif changes.get(b) is not None:
                data[a] = None
        if changes.get("t_index_list") is not None:
            data["strength"] = None
        return validated(type(self), data)

    def updates_to(self, target: LiveParams) -> list[dict[str, Any]]:
        """Live updates, applied in order, that take an engine from these parameters to `target`.

        Used when an engine prepared with an older snapshot takes over (a model switch): the
        values that changed meanwhile arrive as ordinary live updates (prompt transitions and
        all), not as a restart of the stream.
        """
        first: dict[str, Any] = {}
        then: dict[str, Any] = {}
        plain = set(type(self).model_fields) - {m for pair in EXCLUSIVE for m in pair}
        for name in type(self).model_fields:
            if name in plain and getattr(target, name) != getattr(self, name):
                first[name] = getattr(target, name)
        if target.prompts != self.prompts:
            if target.prompt_blend is not None:
                first["prompt_blend"] = target.prompt_blend
            else:
                first["prompt"] = target.prompt
        if target.seeds != self.seeds:
            if target.seed_blend is not None:
                first["seed_blend"] = target.seed_blend
            else:
                first["seed"] = target.seed
        if (target.t_index_list, target.strength) != (self.t_index_list, self.strength):
            if target.strength is None:
                first["t_index_list"] = target.t_index_list
            elif target.steps == self.steps:
                first["strength"] = target.strength
            else:
                # strength keeps T: set T first, then the strength that picks the indices.
                first["t_index_list"] = target.t_index_list
                then["strength"] = target.strength
        return [u for u in (first, then) if u]


EXCLUSIVE: tuple[tuple[str, str], ...] = (("prompt", "prompt_blend"), ("seed", "seed_blend"), ("t_index_list", "strength"))
"""Pairs of fields that set the same state: giving one replaces the other."""


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = model.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


def check_field(model: type[BaseModel], name: str, value: Any) -> Any:
    """One field checked alone, as `model` checks it (its type carries every rule): the value
    converted, or ValueError in the words of `validated()`. A few µs, for the OSC edge."""
    try:
        return _field_adapter(model, name).validate_python(value)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            err = {**err, "loc": (name, *err["loc"])}
            problems.append(f"{name} = {value!r:.200} is not valid: {explain(err, model)}")
        raise ValueError(problems[0]) from None


def validated(model: type[_Frozen], data: Mapping[str, Any]) -> Any:
    """`model.model_validate(data)`, with pydantic's errors turned into one line per problem."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise ValueError(describe_errors(e, data, model)) from None


def describe_errors(error: ValidationError, data: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    """pydantic's errors → "key = value is not valid: what is allowed", one per problem, "; "-joined.

    An error inside a list (one bad t_index) is reported once, on the field, with the range the
    schema gives its items; pydantic's follow-up complaints about the same field are dropped.
    """
    problems: dict[str, str] = {}
    for err in error.errors():
        loc = [p for p in err["loc"]]
        if not loc:
            problems.setdefault("", str(err["msg"]).removeprefix("Value error, "))
            continue
        key = str(loc[0])
        if key in problems:
            continue  # the first (innermost-first in pydantic's order) problem of a field says it
        value = data.get(key) if isinstance(data, Mapping) else None
        problems[key] = f"{key} = {value!r:.200} is not valid: {explain(err, model)}"
    return "; ".join(problems.values())


def explain(err: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    """One pydantic error in the schema's words: ranges as `lo..hi`, choices as a list."""
    kind, ctx = err["type"], err.get("ctx") or {}
    message = str(err["msg"]).removeprefix("Value error, ")
    where = _annotation_at(model, list(err["loc"])) if model is not None else None
    nested = len(err["loc"]) > 1
    noun = (_title(where) if where is not None else None) or "value"
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than") and where is not None:
        lo, hi = _bounds(where)
        if lo is not None and hi is not None:
            return f"every {noun} must be in {_num(lo)}..{_num(hi)}" if nested else f"must be a number in {_num(lo)}..{_num(hi)}"
    if nested and kind.startswith(("int_", "float_")):
        return f"every {noun} must be {'an integer' if kind.startswith('int_') else 'a number'}"
    if kind in ("too_short", "too_long") and where is not None and get_origin(_strip(where)) is tuple:
        lo, hi = _bounds(where, "min_length", "max_length")
        if lo is not None and hi is not None:
            return f"give {lo}..{hi} values" if lo != hi else f"give {lo} values"
    if kind == "missing" and nested and model is not None:
        parent = _strip(_annotation_at(model, list(err["loc"][:-1])))
        if get_origin(parent) is tuple and Ellipsis not in get_args(parent):
            return f"give {len(get_args(parent))} values"
    if kind == "literal_error":
        choices = get_args(_strip(where)) if where is not None else ()
        named = ", ".join(map(str, choices)) if choices else str(ctx.get("expected", ""))
        return f"must be one of {named}"
    if kind in ("tuple_type", "list_type") and where is not None:
        items = get_args(_strip(where))
        pair = _strip(items[0]) if items else None
        names = [_title(a) for a in get_args(pair)] if get_origin(pair) is tuple else []
        if names and all(names):
            return f"give a list of ({', '.join(map(str, names))}) pairs, e.g. [['a cat', 0.7], ['a dog', 0.3]]"
        return "give a list of values"
    return message


def _strip(annotation: Any) -> Any:
    """Annotated[X, ...] and Optional[X] → X."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _title(annotation: Any) -> str | None:
    if get_origin(annotation) is Annotated:
        for meta in get_args(annotation)[1:]:
            if getattr(meta, "title", None):
                return str(meta.title)
    return None


def _annotation_at(model: type[BaseModel], loc: list[Any]) -> Any:
    """The annotation (with its constraints) of the value at `loc` in `model`; None if unknown."""
    current: Any = model
    for part in loc:
        base = _strip(current)
        if isinstance(base, type) and issubclass(base, BaseModel):
            info = base.model_fields.get(str(part))
            if info is None:
                return None
            current = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            continue
        args = get_args(base)
        if get_origin(base) in (tuple, list) and isinstance(part, int) and args:
            current = args[0] if len(args) == 1 or args[-1] is Ellipsis else args[min(part, len(args) - 1)]
            continue
        return None
    return current


def _bounds(annotation: Any, low: str = "ge", high: str = "le") -> tuple[Any, Any]:
    """The (low, high) constraints an Annotated type declares, e.g. (ge, le) or (min_length, max_length)."""
    lo = hi = None
    metas = get_args(annotation)[1:] if get_origin(annotation) is Annotated else ()
    for meta in metas:
        for item in [meta, *getattr(meta, "metadata", [])]:
            lo = getattr(item, low, None) if getattr(item, low, None) is not None else lo
            hi = getattr(item, high, None) if getattr(item, high, None) is not None else hi
    return lo, hi


class NodeParams(_Frozen):
    """Live values the node itself owns (not the engine)."""

    pause: bool = Field(
        False, json_schema_extra=osc("/pause"),
        description="1 pauses (the sinks keep the last frame), 0 resumes. A state, not a toggle.",
    )
    bypass: bool = Field(
        False, json_schema_extra=osc("/bypass"), description="1 passes the input straight through, 0 diffuses again."
    )
    preset: str = Field(
        "", max_length=64, json_schema_extra=osc("/preset"),
        description="Apply the live parameters of a preset by name (a file in the presets folders; no paths). "
        "Reads back the preset in force, empty once anything else changed.",
    )
    model: str = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/model"),
        description="Load another model (hub id, folder, .safetensors, tiny) while the current one keeps "
        "streaming. Rejected unless the node runs with --allow-model-switch.",
    )
    bpm: float = Field(
        120.0, ge=20.0, le=999.0, json_schema_extra=osc("/bpm"),
        description="Tempo of the internal clock (with Link: proposed to the session; MIDI clock: ignored, "
        "the sender sets it). The tempo in force goes out as /streamnode/beat.",
    )
    quantize: Literal[QUANTIZE_MODES] = Field(  # type: ignore[valid-type]
        "off", json_schema_extra=osc("/quantize"),
        description="Hold every change until the next beat, bar or N bars (on the beat, the engine's latency "
        "ahead); one message alone: /at/<grid>/<address>. off: at once.",
    )
    cue: int = Field(
        -1, ge=-1, le=MAX_CUES - 1, json_schema_extra=osc("/cue"),
        description="Go to cue N of the cue list (/cues/N/...); reads back the cue in force (-1: none yet).",
    )
    cue_every: int = Field(
        0, ge=0, le=64, json_schema_extra=osc("/cue_every"),
        description="Step to the next cue every N bars, on the bar (0: only on /cue_next).",
    )
    midi_learn: str = Field(
        "", max_length=256, json_schema_extra=osc("/midi/learn"),
        description="Learn mode: the next MIDI CC or note moved maps to this address (e.g. /guidance); "
        "empty: off. The mapping is saved in the user config folder.",
    )

    @field_validator("midi_learn")
    @classmethod
    def _an_address(cls, v: str) -> str:
        if v and (not v.startswith("/") or any(c.isspace() for c in v)):
            raise ValueError("must be an OSC address such as /guidance (empty: learn mode off)")
        return v


class BrushParams(_Frozen):
    """One regional prompt ("semantic brush"), docs/regions.md; OSC `/brush/N/<name>`. Its mask
    comes from exactly one of `mask`, `rect`, `circle` or `shm` (none: the brush paints nothing
    until a mask arrives)."""

    prompt: str = Field("", max_length=MAX_TEXT, json_schema_extra=osc("/brush/N/prompt"), description="Brush N prompt.")
    negative_prompt: str = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/brush/N/negative_prompt"),
        description="Brush N negative prompt (empty: the global negative prompt).",
    )
    mask_strength: float = Field(
        1.0, ge=0.0, le=1.0, json_schema_extra=osc("/brush/N/strength"), description="Brush N mask strength."
    )
    prompt_strength: float = Field(
        0.95, ge=0.0, le=1.0, json_schema_extra=osc("/brush/N/prompt_strength"),
        description="Brush N prompt strength: embedding mix, 0 = the global prompt, 1 = its own.",
    )
    mask_blur: float = Field(
        0.0, ge=0.0, le=256.0, json_schema_extra=osc("/brush/N/blur"), description="Brush N mask blur (std, pixels)."
    )
    enabled: bool = Field(True, json_schema_extra=osc("/brush/N/enabled"), description="Brush N on (1) or off (0).")
    rect: tuple[Unit, Unit, Unit, Unit] | None = Field(
        None, json_schema_extra=osc("/brush/N/rect", arg_names=("x", "y", "w", "h")),
        description="Brush N mask: rectangle x y w h, normalised 0..1, (x, y) the top-left corner, y down.",
    )
    circle: tuple[Unit, Unit, Unit] | None = Field(
        None, json_schema_extra=osc("/brush/N/circle", arg_names=("x", "y", "r")),
        description="Brush N mask: circle x y r, normalised 0..1; r is a fraction of the shorter frame side.",
    )
    mask: PngPath | None = Field(
        None, max_length=MAX_TEXT, json_schema_extra=osc("/brush/N/mask"),
        description="Brush N mask from a PNG file path (white or opaque = inside).",
    )
    shm: ShmUri | None = Field(
        None, max_length=MAX_TEXT, json_schema_extra=osc("/brush/N/shm"),
        description="Brush N mask from a shm:// mask channel (docs/shm-format.md), e.g. shm://masks?plane=2; "
        "plane = the brush's number unless ?plane=K.",
    )

    @model_validator(mode="after")
    def _one_mask_source(self) -> BrushParams:
        given = [k for k in MASK_SOURCES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one mask source, not {' and '.join(given)}")
        return self


class LoraParams(_Frozen):
    """One LoRA of the stack (docs/lora.md); OSC `/lora/N/<name>`. A LoRA without a source does
    nothing until one arrives; its file is read off the engine thread."""

    source: str = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/lora/N/source"),
        description="LoRA N weights: a .safetensors file, a folder holding one, or a hub id (owner/name); "
        "read off the engine thread, the stream goes on meanwhile. Empty: none.",
    )
    weight: float = Field(
        1.0, ge=-2.0, le=2.0, json_schema_extra=osc("/lora/N/weight"),
        description="LoRA N weight (0 = off, 1 = as trained): runtime mode on the next frame, merged mode "
        "after a re-merge off the engine thread.",
    )
    enabled: bool = Field(
        True, json_schema_extra=osc("/lora/N/enabled"), description="LoRA N on (1) or off (0), keeping its weight."
    )

    @field_validator("source")
    @classmethod
    def _safetensors_only(cls, v: str) -> str:
        if v.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
            raise ValueError("LoRA weights are read from .safetensors only (pickle files can run code)")
        return v


CONTROL_MAP_BUILTINS = ("passthrough", "luma", "edges-soft", "canny")
"""Map sources computed from the input frame with no weights (diffusion/control_maps.py)."""


def is_frame_map(source: str) -> bool:
    """A map made from the input frame (a built-in preprocessor, or a depth model: `depth`,
    `depth:MODEL`), as opposed to an external map from a source URI."""
    return source in CONTROL_MAP_BUILTINS or source == "depth" or source.startswith("depth:")


def _map_source(v: str) -> str:
    if not is_frame_map(v) and "://" not in v:
        raise ValueError(
            f"must be a built-in preprocessor ({', '.join(CONTROL_MAP_BUILTINS)}), depth or depth:MODEL, or a "
            "source URI such as shm://td-depth, ndi://KinectDepth, file://depth.png"
        )
    return v


class ControlNetParams(_Frozen):
    """One ControlNet (docs/controlnet.md); OSC `/controlnet/N/<name>`. A ControlNet without a
    model does nothing until one arrives; its weights are loaded off the engine thread."""

    model: str = Field(
        "", max_length=MAX_TEXT, json_schema_extra=osc("/controlnet/N/model"),
        description="ControlNet N weights: a folder or .safetensors file, a hub id, or tiny; loaded off the "
        "engine thread, the stream goes on meanwhile. Empty: none.",
    )
    map: Annotated[str, AfterValidator(_map_source)] = Field(
        "passthrough", max_length=MAX_TEXT, json_schema_extra=osc("/controlnet/N/map"),
        description="ControlNet N map: a preprocessor of the input frame (passthrough, luma, edges-soft, canny; "
        "depth or depth:MODEL, a transformers depth model) or an external map from a source URI (shm://td-depth, ndi://NAME, file://PATH); the last map holds "
        "while it is away.",
    )
    scale: float = Field(
        1.0, ge=0.0, le=2.0, json_schema_extra=osc("/controlnet/N/scale"),
        description="ControlNet N conditioning scale (0 = off: the net is not evaluated).",
    )
    start: float = Field(
        0.0, ge=0.0, le=1.0, json_schema_extra=osc("/controlnet/N/start"),
        description="ControlNet N guidance start: the first stage it acts on, as a fraction of the stages.",
    )
    end: float = Field(
        1.0, ge=0.0, le=1.0, json_schema_extra=osc("/controlnet/N/end"),
        description="ControlNet N guidance end: stage k (of T) is guided when start ≤ k/T and (k+1)/T ≤ end.",
    )
    canny_low: int = Field(
        100, ge=0, le=255, json_schema_extra=osc("/controlnet/N/canny_low"),
        description="ControlNet N canny map: lower hysteresis threshold.",
    )
    canny_high: int = Field(
        200, ge=0, le=255, json_schema_extra=osc("/controlnet/N/canny_high"),
        description="ControlNet N canny map: upper hysteresis threshold.",
    )
    reuse: int = Field(
        1, ge=1, le=60, json_schema_extra=osc("/controlnet/N/reuse"),
        description="ControlNet N residuals are computed every N frames and reused in between (1 = every frame).",
    )
    enabled: bool = Field(
        True, json_schema_extra=osc("/controlnet/N/enabled"),
        description="ControlNet N on (1) or off (0), keeping its model and scale.",
    )

    @field_validator("model")
    @classmethod
    def _safetensors_only(cls, v: str) -> str:
        if v.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
            raise ValueError("ControlNet weights are read from .safetensors only (pickle files can run code)")
        return v


class LfoParams(_Frozen):
    """One LFO (docs/tempo.md); OSC `/lfo/N/<name>`. It drives `target`, a numeric live parameter,
    to offset + depth·wave every frame (clamped to the target's range); the wave runs −1..1
    (envelope: 1 decaying to 0 over each cycle). No target: it does nothing."""

    target: str = Field(
        "", max_length=64, json_schema_extra=osc("/lfo/N/target"),
        description="LFO N target: the address of a numeric live parameter, e.g. /guidance, /lora/0/weight, "
        "/brush/1/strength. Empty: off.",
    )
    shape: Literal[LFO_SHAPES] = Field(  # type: ignore[valid-type]
        "sine", json_schema_extra=osc("/lfo/N/shape"),
        description="LFO N wave: " + ", ".join(LFO_SHAPES) + " (random: a new value held each cycle).",
    )
    sync: bool = Field(
        True, json_schema_extra=osc("/lfo/N/sync"), description="LFO N on the tempo (1: a cycle lasts `beats`) or "
        "free (0: `hz` cycles a second)."
    )
    beats: float = Field(
        4.0, ge=1 / 16, le=64.0, json_schema_extra=osc("/lfo/N/beats"), description="LFO N cycle in beats (sync 1).",
    )
    hz: float = Field(
        0.25, ge=0.0, le=30.0, json_schema_extra=osc("/lfo/N/hz"), description="LFO N rate in Hz (sync 0; 0 holds still).",
    )
    depth: float = Field(
        0.0, ge=-1000.0, le=1000.0, json_schema_extra=osc("/lfo/N/depth"),
        description="LFO N depth, in the target's units (the wave's ±1 becomes ±depth).",
    )
    offset: float = Field(
        0.0, ge=-1000.0, le=1000.0, json_schema_extra=osc("/lfo/N/offset"),
        description="LFO N centre, in the target's units.",
    )
    phase: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra=osc("/lfo/N/phase"), description="LFO N phase shift.")
    enabled: bool = Field(True, json_schema_extra=osc("/lfo/N/enabled"), description="LFO N on (1) or off (0).")

    @field_validator("target")
    @classmethod
    def _numeric(cls, v: str) -> str:
        if v:
            numeric_target(v)  # raises with the reason
        return v


class CueParams(_Frozen):
    """One cue of the cue list (docs/tempo.md); OSC `/cues/N/<name>`. Going to a cue sets its
    prompt and seed, blending in over its transition."""

    prompt: str = Field("", max_length=MAX_TEXT, json_schema_extra=osc("/cues/N/prompt"), description="Cue N prompt.")
    seed: int = Field(
        -1, ge=-1, le=MAX_SEED, json_schema_extra=osc("/cues/N/seed"), description="Cue N seed (-1: keep the seed).",
    )
    transition: int = Field(
        8, ge=0, le=600, json_schema_extra=osc("/cues/N/transition"),
        description="Cue N transition: frames over which its prompt blends in.",
    )


@dataclass(frozen=True)
class NumericTarget:
    """A numeric live parameter an LFO may drive: its update key (a LiveParams field or an
    indexed group's name), index and field, and its range."""

    key: str
    index: int | None
    field: str
    low: float
    high: float
    integer: bool


def numeric_target(address: str) -> NumericTarget:
    """The numeric live parameter at `address` (/guidance, /lora/0/weight, /brush/1/strength…);
    ValueError naming the choices otherwise."""
    table = _numeric_fields()
    parts = address.split("/")
    index = None
    if len(parts) == 4 and parts[2].isdigit() and len(parts[2]) <= 3:
        index = int(parts[2])
        pattern = f"/{parts[1]}/N/{parts[3]}"
    else:
        pattern = address
    found = table.get(pattern)
    if found is None:
        raise ValueError(f"{address!r} is not a numeric live parameter; use one of {', '.join(table)}")
    key, name, low, high, integer = found
    return NumericTarget(key, index, name, low, high, integer)


@functools.cache
def _numeric_fields() -> dict[str, tuple[str, str, float, float, bool]]:
    """OSC address → (key, field, low, high, integer) of every bounded int or float live field."""
    table: dict[str, tuple[str, str, float, float, bool]] = {}
    models: list[tuple[type[BaseModel], str | None]] = [(LiveParams, None), (BrushParams, "brush"), (LoraParams, "lora")]
    for model, group in models:
        for name, info in model.model_fields.items():
            kind = _strip(info.annotation)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            lo, hi = _bounds(Annotated[(info.annotation, *info.metadata)]) if info.metadata else (None, None)
            if kind in (int, float) and lo is not None and hi is not None and "osc" in extra:
                table[str(extra["osc"])] = (group or name, name, float(lo), float(hi), kind is int)
    return table


MASK_SOURCES = ("mask", "rect", "circle", "shm")
"""The BrushParams fields that give a brush its mask: one at a time, the newest wins."""

BRUSH_ORDER_OSC = osc(
    "/brush/order",
    description="Cover order of the brushes, bottom first (a later brush covers an earlier one): every brush "
    "number once.",
)
"""`brush_order`, the engine's cover order of its brushes (`LiveState.brush_order`)."""


@dataclass(frozen=True)
class Trigger:
    """An OSC address that fires an action rather than setting a value (rising edge: 0→1 fires)."""

    key: str
    address: str
    description: str


TRIGGERS = (
    Trigger("status", "/status", "Ask for a full status reply (state, counters, every current value)."),
    Trigger("clear", "/brush/N/clear", "Remove brush N."),
    Trigger("clear", "/lora/N/clear", "Remove LoRA N."),
    Trigger("clear", "/controlnet/N/clear", "Remove ControlNet N."),
    Trigger("clear", "/lfo/N/clear", "Remove LFO N (its target keeps the last value)."),
    Trigger("clear", "/cues/N/clear", "Remove cue N."),
    Trigger("cue_next", "/cue_next", "Go to the next cue (quantized like any change)."),
    Trigger("downbeat", "/downbeat", "Make now the first beat of a bar (internal clock; a tap from the performer)."),
)


@dataclass(frozen=True)
class IndexedGroup:
    """Values that exist once per index, `/<name>/N/<field>` (brushes, LoRAs). An update's key is
    `name` and its value (index, field, value); a field "clear" removes index N."""

    name: str
    params: type[BaseModel]
    limit: str
    """The `runtime` setting that bounds N (0..limit−1)."""

    @property
    def prefix(self) -> str:
        return f"/{self.name}/"


GROUPS: tuple[IndexedGroup, ...] = (
    IndexedGroup("brush", BrushParams, "max_brushes"),
    IndexedGroup("lora", LoraParams, "max_loras"),
    IndexedGroup("controlnet", ControlNetParams, "max_controlnets"),
    IndexedGroup("lfo", LfoParams, "max_lfos"),
    IndexedGroup("cues", CueParams, "max_cues"),
)
"""The indexed groups of the schema; OSC, OSCQuery, docs and the TouchDesigner page expand them."""


@dataclass(frozen=True, eq=False)
class BrushState:
    """A brush in force as the engine reports it. `params.shm` is the node's (it feeds the engine
    `mask_array`); a brush whose mask came as an array carries a read-only copy of it, so a
    replay onto another engine paints the same region at once."""

    params: BrushParams = field(default_factory=BrushParams)
    mask_array: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        # The same array object, not equal contents: every new mask arrives as a new array.
        return isinstance(other, BrushState) and self.params == other.params and self.mask_array is other.mask_array

    def __hash__(self) -> int:
        return hash((self.params, id(self.mask_array)))

    def edit(self) -> dict[str, Any]:
        """A brush edit (every field, and the one mask source in force) that makes a brush on
        another engine this one (`shm` aside: the node feeds the array it delivered)."""
        params = self.params
        fields = params.model_dump(exclude={*MASK_SOURCES})
        source = next((k for k in ("mask", "rect", "circle") if getattr(params, k) is not None), None)
        fields["mask"] = self.mask_array
        if source is not None and self.mask_array is None:
            del fields["mask"]
            fields[source] = getattr(params, source)
        return fields


@dataclass(frozen=True)
class LiveState:
    """Everything live in force: the engine's parameters and brushes, and the node's own values.

    Immutable and replaced whole, so any thread may read it. The engine fills `params`,
    `brushes`, `brush_order` and `loras`; the node adds `node` and the brushes' shm channels.
    The indexed groups (`GROUPS`: brushes, LoRAs) are read by name with `group()` or all at once
    with `indexed()`: OSC, OSCQuery and the echo need no code per group.
    """

    params: LiveParams = field(default_factory=LiveParams)
    brushes: Mapping[int, BrushState] = field(default_factory=dict)
    brush_order: tuple[int, ...] = ()
    node: NodeParams = field(default_factory=NodeParams)
    loras: Mapping[int, LoraParams] = field(default_factory=dict)
    """The LoRA stack in force (diffusion/lora.py), by index."""
    controlnets: Mapping[int, ControlNetParams] = field(default_factory=dict)
    """The ControlNets in force (diffusion/controlnet.py), by index."""
    lfos: Mapping[int, LfoParams] = field(default_factory=dict)
    """The LFOs in force (the node's, tempo/lfo.py), by index."""
    cues: Mapping[int, CueParams] = field(default_factory=dict)
    """The cue list (the node's, tempo/cues.py), by index."""

    def group(self, name: str) -> Mapping[int, Any]:
        """The params in force of an indexed group (`GROUPS`) by index: brushes' BrushParams, LoRAs'."""
        if name == "brush":
            return {i: self.brushes[i].params for i in self.brush_order if i in self.brushes}
        if name == "lora":
            return self.loras
        if name == "controlnet":
            return self.controlnets
        if name == "lfo":
            return self.lfos
        if name == "cues":
            return self.cues
        raise KeyError(name)

    def replace(self, **changes: Any) -> LiveState:
        return dataclasses.replace(self, **changes)

    def indexed(self) -> dict[str, Mapping[int, Any]]:
        """Every indexed group's members in force, by group name: {"brush": {0: BrushParams…}, "lora": …}."""
        return {g.name: self.group(g.name) for g in GROUPS}
