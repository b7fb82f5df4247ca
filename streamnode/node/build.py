"""Config → a ready engine: the only place the node constructs one.

torch is imported here, lazily, and only for the stream engine, so `--engine passthrough`
and the control-only commands never pay for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamnode.config import NodeConfig
from streamnode.engine import Engine
from streamnode.node.passthrough import PassThroughEngine

EngineFactory = Callable[[NodeConfig], Engine]


def build_engine(config: NodeConfig, progress: Callable[[Any], None] | None = None, *,
                 components: Any = None) -> Engine:
    """The engine for `config.runtime.engine`: loaded, its `[[loras]]` and `[[controlnets]]` applied, accelerated
    (`model.accel`) and prepared with the config's live values. `progress` receives TensorRT build events. `components`:
    already loaded model components to build on instead of loading `model.id` (tests, benchmarks
    that run many engines on one model)."""
    s, m = config.stream, config.model
    if config.runtime.engine == "passthrough":
        engine: Engine = PassThroughEngine(s.width, s.height)
    else:
        from streamnode.accel import accelerate_with_config
        from streamnode.diffusion.models import node_cpu_threads
        from streamnode.diffusion.stream import StreamEngine

        shape = {"t_index_list": s.t_index_list, "width": s.width, "height": s.height,
                 "frame_buffer_size": s.frame_buffer_size, "cfg_type": s.cfg_type,
                 "max_brushes": config.runtime.max_brushes, "lora_mode": m.lora_mode,
                 "max_loras": config.runtime.max_loras, "max_controlnets": config.runtime.max_controlnets}
        if components is not None:
            stream = StreamEngine.from_components(components, **shape)
        else:
            stream = StreamEngine.from_pretrained(
                m.id, device=m.device, dtype=m.dtype, use_tiny_vae=m.use_tiny_vae, tiny_vae=m.tiny_vae,
                lcm_lora=m.lcm_lora, cpu_threads=m.cpu_threads or node_cpu_threads(), **shape,
            )
        try:
            # The preset's LoRAs before acceleration: a TensorRT engine is built with them merged in.
            for index, lora in enumerate(config.loras):
                try:
                    stream.update(lora=(index, lora.model_dump()))
                except ValueError as e:
                    raise ValueError(f"lora {index}: {e}") from None
            # The preset's ControlNets: a bad one fails the start with its number and one line.
            for index, net in enumerate(config.controlnets):
                try:
                    stream.update(controlnet=(index, net.model_dump()))
                except ValueError as e:
                    raise ValueError(f"controlnet {index}: {e}") from None
            accelerate_with_config(stream, m, progress=progress)
        except BaseException:
            stream.close()
            raise
        engine = stream
    engine.prepare(s.live)
    return engine
