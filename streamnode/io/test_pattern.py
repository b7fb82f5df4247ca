"""test://bars, test://noise, test://moving — built-in patterns, paced at a given rate.

    test://bars                   colour bars at the node's size and rate
    test://moving?size=640x360    bars scrolling under a bouncing white box
    test://noise?fps=60           uniform noise

Every frame is drawn into one preallocated image; nothing is allocated per frame.
"""

from __future__ import annotations

import numpy as np

from streamnode.io.base import Pacer, Transport, TransportError, TransportOptions, UriParams

PATTERNS = ("bars", "noise", "moving")

# SMPTE-style 75% bars, left to right.
_BAR_COLOURS = np.array(
    [[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0], [191, 0, 191], [191, 0, 0], [0, 0, 191]],
    dtype=np.uint8,
)


class TestPatternSource(Transport):
    """A synthetic source. `read()` waits until the next frame is due (unless `pace=False`)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, pattern: str = "bars", width: int = 512, height: int = 512, fps: float = 30.0, *,
                 pace: bool = True, seed: int = 0, uri: str = "") -> None:
        if pattern not in PATTERNS:
            raise TransportError(f"test://{pattern}: unknown pattern; use one of {', '.join(PATTERNS)}")
        self.uri = uri or f"test://{pattern}"
        self.pattern = pattern
        self.width, self.height = width, height
        self.fps = fps
        self.pace = pace
        self.seed = seed
        self._image = np.zeros((height, width, 3), np.uint8)
        self._strip = np.zeros((height, 2 * width, 3), np.uint8)
        self._noise = np.zeros(0, np.uint8)
        self._rng = np.random.default_rng(seed)
        self._count = 0
        self._pacer = Pacer(fps)
        self._open = False

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> TestPatternSource:
        width, height = params.size("size", (options.width, options.height))
        fps = params.number("fps", options.fps, minimum=0.001)
        seed = params.integer("seed", 0)
        params.done()
        return cls(target or "bars", width, height, fps, pace=options.realtime, seed=seed, uri=uri)

    def open(self) -> None:
        h, w = self.height, self.width
        bars = np.repeat(_BAR_COLOURS, -(-w // len(_BAR_COLOURS)), axis=0)[:w]
        self._image[:] = bars[None, :, :]
        self._strip[:, :w] = self._image
        self._strip[:, w:] = self._image
        if self.pattern == "noise":
            # A pool a bit larger than one frame: each frame is a window at a random offset.
            self._noise = self._rng.integers(0, 256, h * w * 3 + 4096, dtype=np.uint8)
        self._count = 0
        self._pacer.reset()
        self._open = True

    def read(self, timeout: float) -> np.ndarray | None:
        if not self._open:
            raise RuntimeError(f"{self.uri}: read() before open()")
        if self.pace and not self._pacer.wait(timeout):
            return None
        self._draw(self._count)
        self._count += 1
        return self._image

    def _draw(self, n: int) -> None:
        h, w = self.height, self.width
        if self.pattern == "noise":
            offset = int(self._rng.integers(0, 4096))
            np.copyto(self._image.reshape(-1), self._noise[offset : offset + h * w * 3])
        elif self.pattern == "moving":
            shift = (n * max(1, w // 128)) % w
            np.copyto(self._image, self._strip[:, shift : shift + w])
            # A white box bouncing on a diagonal, so motion shows on both axes.
            box = max(2, min(w, h) // 8)
            x = _bounce(n * 3, w - box)
            y = _bounce(n * 2, h - box)
            self._image[y : y + box, x : x + box] = 255

    def close(self) -> None:
        self._open = False


def _bounce(t: int, span: int) -> int:
    if span <= 0:
        return 0
    t %= 2 * span
    return t if t < span else 2 * span - t
