"""Built-in ControlNet map preprocessors that need no weights: the input frame → a control map.

A preprocessor takes the engine's input images, (F, 3, H, W) in [-1, 1], and returns the map
the ControlNet reads, (F, 3, H, W) in [0, 1] (diffusers' ControlNet conditioning range):

    passthrough   the frame itself
    luma          Y = 0.299·R + 0.587·G + 0.114·B, grey
    edges-soft    Sobel gradient magnitude of the luma, |∇Y|·4 clipped to 1 (soft, anti-aliased edges)
    canny         OpenCV's Canny on the luma with live thresholds (binary edges, as the canny nets were trained)

`depth` / `depth:MODEL` needs weights (depth_maps.py): `make_map` loads the model on first use,
so call it off the engine thread (the node does, on the net's `controlmap:<N>` thread).

The torch ones run on the engine's device; canny runs on the CPU (OpenCV). A map source that is
not one of these is an external map (`shm://`, `ndi://`, `file://`…): the node reads it from
that transport and hands it to the engine (docs/controlnet.md).
"""

from __future__ import annotations

import numpy as np
import torch

BUILTIN_MAPS: tuple[str, ...] = ("passthrough", "luma", "edges-soft", "canny")

_LUMA = (0.299, 0.587, 0.114)
_EDGE_GAIN = 4.0
"""|∇Y| of a hard black/white edge is 4 (Sobel on [0, 1]); gain 4 makes a mid-contrast edge visible."""


def is_builtin(source: str) -> bool:
    return source in BUILTIN_MAPS


def luma(image: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) in [-1, 1] → (F, 1, H, W) luma in [0, 1]."""
    r, g, b = ((image[:, c : c + 1] + 1.0) * 0.5 for c in range(3))
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).clamp_(0.0, 1.0)


def edges_soft(image: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luma, (F, 1, H, W) in [0, 1]."""
    y = luma(image)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=y.device, dtype=y.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    grad = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    return (grad.square().sum(1, keepdim=True).sqrt() * (_EDGE_GAIN / 4.0)).clamp_(0.0, 1.0)


def canny(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """OpenCV Canny on the luma (uint8), (F, 1, H, W) in {0, 1} on the image's device."""
    import cv2

    y8 = (luma(image) * 255.0).round_().to(torch.uint8).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(frame[0]), low, high) for frame in y8])
    return torch.from_numpy(edges).unsqueeze(1).to(image.device, image.dtype).div_(255.0)


def make_map(source: str, image: torch.Tensor, *, canny_low: int = 100, canny_high: int = 200) -> torch.Tensor:
    """The built-in map `source` of `image` ((F, 3, H, W) in [-1, 1]) → (F, 3, H, W) in [0, 1]."""
    if source == "passthrough":
        return ((image + 1.0) * 0.5).clamp_(0.0, 1.0)
    if source == "depth" or source.startswith("depth:"):
        from streamnode.diffusion.depth_maps import depth_map

        return depth_map(source, image)
    if source == "luma":
        grey = luma(image)
    elif source == "edges-soft":
        grey = edges_soft(image)
    elif source == "canny":
        grey = canny(image, canny_low, canny_high)
    else:
        raise ValueError(f"map {source!r} is not a built-in preprocessor ({', '.join(BUILTIN_MAPS)})")
    return grey.expand(-1, 3, -1, -1).contiguous()
