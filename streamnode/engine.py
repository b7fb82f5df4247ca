"""The `Engine` protocol: what the node needs from an engine, and nothing more.

Two engines implement it: the stream-batch diffusion engine (`diffusion.stream.StreamEngine`)
and the model-free pass-through (`node.passthrough.PassThroughEngine`). The node calls only
these members, from its engine thread (`live_params()` and `stats` may be read from any).
Contract, for every implementation:

- `prepare(live)` sets all live parameters at once and empties the stream; `update(**changes)`
  applies live changes between frames, validated against the schema (live_params.py), all or
  nothing: a bad value raises ValueError and leaves the engine as it was.
- `live_params()` returns the immutable `LiveState` in force: the node replays it onto another
  engine (a model switch) and control surfaces read it. It is the only record of live values.
- `__call__(image)` takes uint8 RGB H×W×3 (F×H×W×3 when `frame_buffer_size` F > 1) and returns
  the same shape; the result belongs to the caller. `txt2img()` takes no input.
- `delay_calls`: calls between a frame going in and its result coming out (T − 1).
- `close()` releases what the engine holds beyond Python objects (accelerated engines, device
  memory); it is safe twice and the engine is not called afterwards.
- LoRA edits (`update(lora=(index, field, value))`) may have heavy work (reading a file, merging
  weights): `lora_heavy(edit)` says so, and `prepare_lora(edit)` does that work on any thread
  without changing the engine; `update(lora=plan)` then commits it between frames.
- ControlNet edits (`update(controlnet=(index, field, value))`) likewise: `controlnet_heavy(edit)`
  (a model to load), `prepare_controlnet(edit)` on any thread, `update(controlnet=plan)`;
  `set_control_map(index, image)` hands a net the map of the next frames (an external source).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamnode.live_params import LiveParams, LiveState


@runtime_checkable
class Engine(Protocol):
    width: int
    height: int
    frame_buffer_size: int

    @property
    def stats(self) -> Mapping[str, int]:
        """Counters: at least `frames` and `skipped` (frames skipped by the similarity filter)."""
        ...

    @property
    def delay_calls(self) -> int: ...

    def prepare(self, live: LiveParams | None = None, **changes: Any) -> None: ...

    def update(self, **changes: Any) -> None: ...

    def __call__(self, image: np.ndarray) -> np.ndarray: ...

    def txt2img(self) -> np.ndarray: ...

    def live_params(self) -> LiveState: ...

    def lora_heavy(self, edit: Any) -> bool: ...

    def prepare_lora(self, edit: Any) -> Any: ...

    def controlnet_heavy(self, edit: Any) -> bool: ...

    def prepare_controlnet(self, edit: Any) -> Any: ...

    def set_control_map(self, index: int, image: np.ndarray, *, derived: bool = False) -> None: ...

    def close(self) -> None: ...
