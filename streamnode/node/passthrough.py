"""The pass-through engine: the `Engine` protocol without a model (`--engine passthrough`).

It returns the input resized to the output size: for transport tests and benchmarks, and a way
to check a rig's video path before loading a model. Its live parameters and brushes are
validated by the same schema as the stream engine's (live_params.py) and reported the same way,
so control surfaces, presets and model switches behave exactly as with a model.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from streamnode.live_params import BrushParams, BrushState, LiveParams, LiveState, validated

_BRUSH_EDIT_FIELDS = frozenset(BrushParams.model_fields) - {"shm"} | {"clear", "order"}


class PassThroughEngine:
    """Input resized to `width`×`height`. The returned array is reused by the next call."""

    delay_calls = 0  # an output belongs to the input of the same call
    frame_buffer_size = 1

    def __init__(self, width: int = 512, height: int = 512, **_: Any) -> None:
        self.width, self.height = width, height
        self._out = np.zeros((height, width, 3), np.uint8)
        self._outs: np.ndarray | None = None
        self._pattern_x = np.arange(width, dtype=np.int32)[None, :]
        self._live = LiveState()
        self.stats: dict[str, int] = {"frames": 0, "skipped": 0, "unet_calls": 0}

    # -- live parameters

    def prepare(self, live: LiveParams | None = None, **changes: Any) -> None:
        base = self._live.params if live is None else live
        self._live = self._live.replace(params=base.apply(changes) if changes else base)

    def update(self, **changes: Any) -> None:
        if "lora" in changes:
            self.prepare_lora(changes["lora"])
        if "controlnet" in changes:
            self.prepare_controlnet(changes["controlnet"])
        brush = changes.pop("brush", None)
        order = changes.pop("brush_order", None)
        state = self._live
        if changes:
            state = state.replace(params=state.params.apply(changes))
        if brush is not None:
            state = self._brush_edit(state, brush)
        if order is not None:
            if sorted(order) != sorted(state.brush_order):
                raise ValueError(f"brush_order {list(order)}: give every brush number once; brushes: "
                                 f"{sorted(state.brush_order)}")
            state = state.replace(brush_order=tuple(int(i) for i in order))
        self._live = state

    def _brush_edit(self, state: LiveState, edit: Any) -> LiveState:
        index, fields = (edit[0], {edit[1]: edit[2]}) if len(edit) == 3 else (edit[0], dict(edit[1]))
        unknown = set(fields) - _BRUSH_EDIT_FIELDS
        if unknown:
            raise ValueError(f"unknown brush field(s) {', '.join(sorted(unknown))}")
        brushes, order = dict(state.brushes), list(state.brush_order)
        if "clear" in fields:
            if index not in brushes:
                raise ValueError(f"brush {index} does not exist")
            del brushes[index]
            order.remove(index)
            return state.replace(brushes=brushes, brush_order=tuple(order))
        old = brushes.get(index, BrushState())
        array = old.mask_array
        values = {k: v for k, v in fields.items() if k != "order"}
        if "mask" in values and values["mask"] is not None and not isinstance(values["mask"], str):
            array, values["mask"] = np.array(values["mask"]), None
        elif any(k in values for k in ("mask", "rect", "circle")):
            array = None
        if any(k in values for k in ("mask", "rect", "circle")):
            values = {"mask": None, "rect": None, "circle": None, **values}
        params = validated(BrushParams, {**old.params.model_dump(), **values})
        brushes[index] = BrushState(params, array)
        if index not in order:
            order.append(index)
        return state.replace(brushes=brushes, brush_order=tuple(order))

    def live_params(self) -> LiveState:
        return self._live

    def lora_heavy(self, edit: Any) -> bool:
        return False

    def prepare_lora(self, edit: Any) -> Any:
        raise ValueError("the passthrough engine has no model: LoRAs need --engine stream")

    def controlnet_heavy(self, edit: Any) -> bool:
        return False

    def prepare_controlnet(self, edit: Any) -> Any:
        raise ValueError("the passthrough engine has no model: ControlNets need --engine stream")

    def set_control_map(self, index: int, image: np.ndarray, *, derived: bool = False) -> None:
        raise ValueError("the passthrough engine has no model: ControlNets need --engine stream")

    # -- frames

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.stats["frames"] += 1
        if image.ndim == 4:  # a frame_buffer_size batch
            if self._outs is None or self._outs.shape[0] != image.shape[0]:
                self._outs = np.zeros((image.shape[0], self.height, self.width, 3), np.uint8)
            for src, dst in zip(image, self._outs, strict=True):
                self._resize(src, dst)
            return self._outs
        return self._resize(image, self._out)

    def _resize(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if src.shape == dst.shape:
            np.copyto(dst, src)
        else:
            cv2.resize(src, (self.width, self.height), dst=dst, interpolation=cv2.INTER_AREA)
        return dst

    def txt2img(self) -> np.ndarray:
        """A moving gradient, so a txt2img pipeline test sees frames change."""
        self.stats["frames"] += 1
        shift = self.stats["frames"] * 4
        self._out[:, :, 0] = ((self._pattern_x + shift) % 256).astype(np.uint8)
        self._out[:, :, 1] = 128
        self._out[:, :, 2] = 255 - self._out[:, :, 0]
        return self._out

    def close(self) -> None:
        self._outs = None
