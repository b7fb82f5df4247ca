"""Fit a source frame to the engine's size: cover (crop), contain (letterbox) or stretch.

The engine's output size is fixed; sources come in any size. `Fitter` writes straight into a
preallocated destination, so fitting allocates nothing per frame.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

FitMode = Literal["cover", "contain", "stretch"]
FIT_MODES: tuple[str, ...] = ("cover", "contain", "stretch")


class Fitter:
    """Resizes frames of any size into `out` (`height×width×3`) by one fit mode.

    - cover: scale to fill, centre-crop the overflow (no bars, edges lost).
    - contain: scale to fit inside, black bars on the short side (nothing lost).
    - stretch: scale each axis on its own (aspect ratio lost).
    """

    def __init__(self, width: int, height: int, mode: FitMode = "cover") -> None:
        if mode not in FIT_MODES:
            raise ValueError(f"fit mode {mode!r}: use one of {', '.join(FIT_MODES)}")
        self.width = width
        self.height = height
        self.mode = mode
        # Geometry depends only on the source size: cache it for the last size seen.
        self._src_shape: tuple[int, int] | None = None
        self._crop: tuple[slice, slice] = (slice(None), slice(None))
        self._dst: tuple[slice, slice] = (slice(None), slice(None))
        self._interp = cv2.INTER_AREA

    def _plan(self, h: int, w: int) -> None:
        W, H = self.width, self.height
        self._crop = (slice(0, h), slice(0, w))
        self._dst = (slice(0, H), slice(0, W))
        if self.mode == "cover":
            scale = max(W / w, H / h)
            cw, ch = min(w, round(W / scale)), min(h, round(H / scale))
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            self._crop = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        elif self.mode == "contain":
            scale = min(W / w, H / h)
            dw, dh = max(1, min(W, round(w * scale))), max(1, min(H, round(h * scale)))
            x0, y0 = (W - dw) // 2, (H - dh) // 2
            self._dst = (slice(y0, y0 + dh), slice(x0, x0 + dw))
        else:
            scale = min(W / w, H / h)
        # Area averaging when shrinking (no aliasing), bilinear when enlarging.
        self._interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        self._src_shape = (h, w)

    def __call__(self, src: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fit `src` (`h×w×3` uint8) into `out` (`height×width×3` uint8) and return `out`."""
        h, w = src.shape[:2]
        if (h, w) == (self.height, self.width):
            np.copyto(out, src)
            return out
        if self._src_shape != (h, w):
            self._plan(h, w)
        region = out[self._dst]
        if self.mode == "contain":
            # The bars must be black in the slot written now, not just the first time.
            out[: self._dst[0].start] = 0
            out[self._dst[0].stop :] = 0
            out[:, : self._dst[1].start] = 0
            out[:, self._dst[1].stop :] = 0
        dw, dh = region.shape[1], region.shape[0]
        cv2.resize(src[self._crop], (dw, dh), dst=region, interpolation=self._interp)
        return out
