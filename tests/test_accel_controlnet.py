"""ONNX graphs for ControlNets (accel/controlnet_export.py), checked against onnxruntime: the UNet
with residual inputs (zeros = no ControlNet), a ControlNet, and an engine whose UNet seam is the
onnxruntime graph streaming with a ControlNet. Tiny model, CPU, fp32, 64²."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from streamnode.accel.controlnet_export import (  # noqa: E402
    ControlNetStep,
    OnnxRuntimeRunner,
    ResidualUnetCall,
    UNetWithResiduals,
    controlnet_inputs,
    export_controlnet,
    export_unet_with_residuals,
    residual_shapes,
    unet_residual_inputs,
)
from streamnode.diffusion.stream import StreamEngine  # noqa: E402
from streamnode.diffusion.tiny_controlnet import random_controlnet  # noqa: E402

SIZE = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def net(tiny_components):  # noqa: ANN001, ANN201
    return random_controlnet(tiny_components.unet, 4)


@pytest.fixture(scope="module")
def graphs(tiny_components, net, tmp_path_factory):  # noqa: ANN001, ANN201
    folder = tmp_path_factory.mktemp("onnx-controlnet")
    export_unet_with_residuals(tiny_components, folder / "unet.onnx", batch=2, height=SIZE, width=SIZE)
    export_controlnet(net, tiny_components, folder / "controlnet.onnx", batch=2, height=SIZE, width=SIZE)
    return folder / "unet.onnx", folder / "controlnet.onnx"


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_residual_shapes_are_what_a_controlnet_gives(tiny_components, net) -> None:  # noqa: ANN001
    inputs = controlnet_inputs(tiny_components, batch=1, height=SIZE, width=SIZE)
    with torch.no_grad():
        outs = ControlNetStep(net, 0)(*inputs)
    assert [tuple(o.shape[1:]) for o in outs] == residual_shapes(tiny_components.unet.config, SIZE // 8, SIZE // 8)


@pytest.mark.parametrize(("batch", "size"), [(2, SIZE), (3, 128)])
def test_unet_graph_with_residuals_matches_pytorch_and_zeros_are_no_controlnet(tiny_components, graphs, batch, size) -> None:  # noqa: ANN001
    run = OnnxRuntimeRunner(graphs[0])
    module = UNetWithResiduals(tiny_components.unet, 0)
    inputs = unet_residual_inputs(tiny_components, batch=batch, height=size, width=size, seed=3)
    zeros = unet_residual_inputs(tiny_components, batch=batch, height=size, width=size, seed=3, zeros=True)
    with torch.no_grad():
        ref = module(*inputs)
        plain = tiny_components.unet(*zeros[:2], encoder_hidden_states=zeros[2], return_dict=False)[0]
    assert maxdiff(run(*inputs), ref) <= TOL
    assert maxdiff(run(*zeros), plain) <= TOL
    assert maxdiff(ref, plain) > 1e-2  # the residuals matter


def test_controlnet_graph_matches_pytorch(tiny_components, net, graphs) -> None:  # noqa: ANN001
    run = OnnxRuntimeRunner(graphs[1], outputs="all")
    inputs = controlnet_inputs(tiny_components, batch=3, height=128, width=128, seed=5)
    with torch.no_grad():
        ref = ControlNetStep(net, 0)(*inputs)
    got = run(*inputs)
    assert len(got) == len(ref) and all(maxdiff(g, r) <= TOL for g, r in zip(got, ref, strict=True))


def test_an_engine_on_the_graph_streams_with_and_without_a_controlnet(tiny_components, net, graphs, tmp_path) -> None:  # noqa: ANN001
    """One graph serves 0 and 1 nets: the engine on onnxruntime equals the engine on PyTorch."""
    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    kw = dict(t_index_list=[20, 45], width=SIZE, height=SIZE, cfg_type="self", similarity_threshold=0.0)
    eager = StreamEngine.from_components(tiny_components, **kw)
    onnx_engine = StreamEngine.from_components(tiny_components, **kw)
    onnx_engine.unet_call = ResidualUnetCall(OnnxRuntimeRunner(graphs[0]), tiny_components.unet.config)
    g = torch.Generator().manual_seed(0)
    frame = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(SIZE, SIZE), mode="bilinear")[0]
    for engine in (eager, onnx_engine):
        engine.prepare(prompt="a fox")
    assert maxdiff(onnx_engine(frame), eager(frame)) <= 1e-3
    for engine in (eager, onnx_engine):
        engine.update(controlnet=(0, {"model": str(tmp_path / "net"), "map": "edges-soft"}))
    with_net = [e(frame) for e in (eager, onnx_engine)]
    assert maxdiff(with_net[1], with_net[0]) <= 1e-3
    assert onnx_engine.controlnets.stats["controlnet_calls"] == 1


# -- the TensorRT UNet with residual inputs: shapes and cache keys (the build needs a GPU) ------


def test_tensorrt_unet_control_profile_covers_every_residual(tiny_components, graphs) -> None:  # noqa: ANN001
    import onnx

    from streamnode.accel.profile import profile_for
    from streamnode.accel.tensorrt import engine_inputs, input_shapes

    profile = profile_for(steps=2, frames=1, width=512, height=384, min_size=256, max_size=1024)
    shapes = input_shapes("unet_control", profile, text_dim=64, unet_config=tiny_components.unet.config)
    names = engine_inputs(tiny_components, "unet_control")
    graph_inputs = [i.name for i in onnx.load(str(graphs[0]), load_external_data=False).graph.input]
    assert list(shapes) == list(names) == graph_inputs  # the runner binds by these names, in this order
    config = tiny_components.unet.config
    for point, (h, w) in enumerate(((32, 32), (48, 64), (128, 128))):  # min, opt, max latent sides
        batch = shapes["sample"][point][0]
        expected = [(batch, *s) for s in residual_shapes(config, h, w)]
        assert [shapes[n][point] for n in names[3:]] == expected


def test_tensorrt_unet_control_has_its_own_cache_key(tiny_components) -> None:  # noqa: ANN001
    from streamnode.accel.profile import profile_for
    from streamnode.accel.tensorrt import make_key

    profile = profile_for(steps=2, frames=1, width=512, height=512)
    keys = {c: make_key(tiny_components, c, profile, trt_version="10.13.0", gpu_name="GPU", compute_capability="9.0")
            for c in ("unet", "unet_control")}
    assert keys["unet_control"].weights == keys["unet"].weights  # the same UNet weights …
    assert keys["unet_control"] != keys["unet"]  # … in another engine (more inputs)


def test_tensorrt_wiring_keeps_controlnet_frames_on_the_unet_control_engine(tiny_components, net, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """`_use_tensorrt` with controlnet_inputs, TensorRT stubbed by PyTorch-backed runners (the real
    ones need a GPU): frames with a ControlNet run on the residual engine, none falls back."""
    import streamnode.accel.tensorrt as trt_mod
    from streamnode import accel
    from streamnode.accel.cache import EngineCache, EngineKey
    from streamnode.accel.onnx_export import component_module

    cache = EngineCache(tmp_path / "cache")
    asked: list[tuple[str, ...]] = []

    def fake_ensure(components, profile, *, which, **_kw):  # noqa: ANN001, ANN003, ANN202
        asked.append(tuple(which))
        ready = {}
        for component in which:
            key = EngineKey(component, components.identity, "w", "", "taesd", profile, "float32", "10.13", "GPU", "9.0")
            module = (UNetWithResiduals(components.unet, 0) if component == "unet_control"
                      else component_module(components, component))
            ready[component] = trt_mod.ReadyEngine(component, module, cache.store(key, b"plan"), True, 0.0)
        return ready

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_mod, "ensure_engines", fake_ensure)
    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    kw = dict(t_index_list=[20, 45], width=SIZE, height=SIZE, cfg_type="self", similarity_threshold=0.0)
    engine, reference = (StreamEngine.from_components(tiny_components, **kw) for _ in range(2))
    assert accel.accelerate(engine, "tensorrt", min_size=64, max_size=256, controlnet_inputs=True) == "tensorrt"
    assert asked == [("unet_control", "vae_encoder", "vae_decoder")]
    for e in (engine, reference):
        e.prepare(prompt="a fox")
        e.update(controlnet=(0, {"model": str(tmp_path / "net"), "map": "luma"}))
    frame = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert maxdiff(engine(frame), reference(frame)) <= 1e-4
    assert engine.unet_call.fallback_calls == 0 and engine.controlnets.stats["controlnet_calls"] == 2


# -- OpenVINO: the UNet with residual inputs, compiled when a ControlNet first acts ------------


def test_openvino_unet_routes_controlnet_calls_to_the_residual_model() -> None:
    """OvUnet (stand-in parts): calls without `control` go to the plain UNet, calls with it to the
    UNet with residual inputs, residuals appended in graph order; each part judges its own shapes."""
    from streamnode.accel import GuardedCall
    from streamnode.accel.openvino import OvUnet

    class Part:
        def __init__(self, name: str, ready: bool) -> None:
            self.name, self.ready, self.calls = name, ready, []

        def accepts(self, *args):  # noqa: ANN002, ANN202
            return None if self.ready else f"{self.name} not compiled"

        def __call__(self, *args):  # noqa: ANN002, ANN202
            self.calls.append(len(args))
            return torch.full((1,), float(len(args)))

    plain, control = Part("plain", True), Part("control", False)
    unet = OvUnet(plain, control)  # type: ignore[arg-type]
    guard = GuardedCall("unet_call", "openvino", unet, lambda *a, **k: torch.zeros(1), accepts=unet.accepts)
    x, t, e = torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 64)
    residuals = ((torch.zeros(1), torch.zeros(1), torch.zeros(1)), torch.zeros(1))
    assert float(guard(x, t, e)[0]) == 3.0 and plain.calls == [3]
    assert float(guard(x, t, e, control=residuals)[0]) == 0.0 and guard.fallback_calls == 1  # not compiled yet
    control.ready = True
    assert float(guard(x, t, e, control=residuals)[0]) == 7.0 and control.calls == [7]  # 3 + 3 down + mid


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STREAMNODE_RUN_SLOW"),
                    reason="compiles two tiny UNets and two VAEs in OpenVINO (~40 s here); set STREAMNODE_RUN_SLOW=1")
def test_openvino_keeps_controlnet_frames_in_openvino_once_compiled(tiny_components, net, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("openvino")
    from streamnode import accel
    from streamnode.accel.cache import EngineCache

    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    kw = dict(t_index_list=[20, 45], width=SIZE, height=SIZE, cfg_type="self", similarity_threshold=0.0)
    engine, reference = (StreamEngine.from_components(tiny_components, **kw) for _ in range(2))
    assert accel.accelerate(engine, "openvino", openvino_precision="fp32", threads=1,
                            cache=EngineCache(tmp_path / "cache")) == "openvino"
    for e in (engine, reference):
        e.prepare(prompt="a fox")
        e.update(controlnet=(0, {"model": str(tmp_path / "net"), "map": "luma"}))
    frame = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    guard = engine.unet_call
    first = engine(frame)  # the residual UNet is compiled in the background: these calls run in PyTorch
    assert guard.fallback_calls == 2 and guard.broken is None
    assert guard.fast.control.compiler.wait(120)
    again = engine(frame)
    assert guard.fallback_calls == 2  # now in OpenVINO, residuals and all
    ref = [reference(frame) for _ in range(2)]
    assert maxdiff(first, ref[0]) <= 1e-4 and maxdiff(again, ref[1]) <= 1e-3
