"""Depth maps for ControlNets from a depth model (Depth Anything, DPT) through transformers.

`map = "depth"` uses `DEFAULT_DEPTH_MODEL`; `map = "depth:SOURCE"` any depth-estimation model
transformers loads with `AutoModelForDepthEstimation` (a hub id or a folder; safetensors only).
The model is loaded lazily, once per (source, device, dtype), the first time a map is asked for:
in the node on the net's `controlmap:<N>` thread, never on the engine thread. The map is the
model's relative depth resized to the frame, min–max normalised per frame, near = bright (the
convention depth ControlNets were trained on).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
_LOCK = threading.Lock()


def is_depth(source: str) -> bool:
    return source == "depth" or source.startswith("depth:")


def depth_model_id(source: str) -> str:
    return DEFAULT_DEPTH_MODEL if source == "depth" else source.removeprefix("depth:")


class DepthEstimator:
    """A depth model and its input size and normalisation; `__call__` maps frames to depth maps."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        try:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError as e:
            raise ValueError(f"depth maps need transformers ({e})") from None
        try:
            processor = AutoImageProcessor.from_pretrained(model_id)
            model = AutoModelForDepthEstimation.from_pretrained(model_id, use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is one line to the user
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"depth model {model_id}: cannot load it ({first}); give a local folder with map = \"depth:PATH\", "
                "or make the map in another program and send it over shm:// or NDI"
            ) from None
        size = processor.size
        self.height = int(getattr(size, "height", None) or size["height"])
        self.width = int(getattr(size, "width", None) or size["width"])
        self.mean = torch.tensor(processor.image_mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) in [-1, 1] → (F, 3, H, W) depth in [0, 1], near = bright."""
        height, width = image.shape[2:]
        x = torch.nn.functional.interpolate((image + 1.0) * 0.5, size=(self.height, self.width), mode="bilinear",
                                            align_corners=False)
        depth = self.model(pixel_values=(x - self.mean) / self.std).predicted_depth[:, None]
        depth = torch.nn.functional.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        lo = depth.amin(dim=(1, 2, 3), keepdim=True)
        hi = depth.amax(dim=(1, 2, 3), keepdim=True)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a flat depth maps to 0, not NaN
        return ((depth - lo) / span).expand(-1, 3, -1, -1).contiguous()


@functools.lru_cache(maxsize=4)
def _estimator(model_id: str, device: torch.device, dtype: torch.dtype) -> DepthEstimator:
    logger.info("loading the depth model %s", model_id)
    return DepthEstimator(model_id, device, dtype)


def depth_map(source: str, image: torch.Tensor) -> torch.Tensor:
    """The depth map of `image` ((F, 3, H, W) in [-1, 1]) by the model `source` names; loads it on
    first use. Raises ValueError with one line when the model cannot be loaded."""
    with _LOCK:  # two nets asking for the same model at once load it once
        estimator: Any = _estimator(depth_model_id(source), image.device, image.dtype)
    return estimator(image)
