"""streamnode: a headless realtime video node (StreamDiffusion-style stream-batch img2img)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["StreamEngine", "__version__"]

if TYPE_CHECKING:
    from streamnode.diffusion.stream import StreamEngine


def __getattr__(name: str) -> Any:
    # torch is heavy: `streamnode doctor`, `streamnode osc` and the transports must not pay for it.
    if name == "StreamEngine":
        from streamnode.diffusion.stream import StreamEngine

        return StreamEngine
    raise AttributeError(name)
