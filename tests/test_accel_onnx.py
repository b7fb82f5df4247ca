"""ONNX export parity: each graph run by onnxruntime on the CPU against PyTorch, tiny model.

Every graph is checked at two batch sizes and two resolutions (one non-square), which proves
the batch and spatial axes are really dynamic, not baked in at the traced shape.
"""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from streamnode.accel.onnx_export import (  # noqa: E402
    DYNAMIC_AXES,
    IO_NAMES,
    OPSET,
    export_onnx,
    max_abs_error,
    sample_inputs,
)

COMPONENTS = ("unet", "vae_encoder", "vae_decoder")
SHAPES = [(1, 64, 64), (3, 128, 64)]  # (batch, height, width) in pixels; traced at (2, 64, 64)
FP32_BOUND = 1e-4
"""Measured: ≤ 2e-6 (UNet), ≤ 1e-5 (full VAE decoder); 1e-4 leaves room for other CPUs' kernels."""


@pytest.fixture(scope="module")
def full_vae_components(tiny_model_path):  # noqa: ANN001, ANN201
    from streamnode.diffusion.models import load_components

    return load_components("tiny", device="cpu", dtype="float32", use_tiny_vae=False)


@pytest.fixture(scope="module")
def exported_taesd(tiny_components, tmp_path_factory):  # noqa: ANN001, ANN201
    out = tmp_path_factory.mktemp("onnx-taesd")
    return {c: export_onnx(tiny_components, c, out / f"{c}.onnx", batch=2, height=64, width=64) for c in COMPONENTS}


@pytest.mark.parametrize("component", COMPONENTS)
def test_taesd_export_matches_pytorch_at_two_batches_and_sizes(tiny_components, exported_taesd, component):  # noqa: ANN001
    report = exported_taesd[component]
    for batch, height, width in SHAPES:
        inputs = sample_inputs(tiny_components, component, batch=batch, height=height, width=width, seed=batch)
        err = max_abs_error(tiny_components, component, report.path, inputs)
        print(f"{component} taesd B={batch} {width}x{height}: max abs error {err:.2e}")
        assert err < FP32_BOUND


@pytest.mark.parametrize("component", ["vae_encoder", "vae_decoder"])
def test_full_vae_export_matches_pytorch(full_vae_components, tmp_path, component):  # noqa: ANN001
    report = export_onnx(full_vae_components, component, tmp_path / f"{component}.onnx", batch=2, height=64, width=64)
    for batch, height, width in SHAPES:
        inputs = sample_inputs(full_vae_components, component, batch=batch, height=height, width=width, seed=7)
        err = max_abs_error(full_vae_components, component, report.path, inputs)
        print(f"{component} full B={batch} {width}x{height}: max abs error {err:.2e}")
        assert err < FP32_BOUND


def test_graph_has_symbolic_batch_and_spatial_axes(exported_taesd):  # noqa: ANN001
    for component, report in exported_taesd.items():
        model = onnx.load(str(report.path))
        assert model.opset_import[0].version == OPSET or any(o.version == OPSET for o in model.opset_import)
        names = [i.name for i in model.graph.input]
        assert tuple(names) == IO_NAMES[component][0]
        for tensor in [*model.graph.input, *model.graph.output]:
            dims = tensor.type.tensor_type.shape.dim
            for axis in DYNAMIC_AXES[component][tensor.name]:
                assert dims[axis].dim_param, f"{component}.{tensor.name} axis {axis} is fixed at {dims[axis].dim_value}"


def test_cleanup_folds_constants(exported_taesd):  # noqa: ANN001
    report = exported_taesd["unet"]
    assert report.cleanup in ("onnx-graphsurgeon", "onnxruntime")
    assert report.nodes_final < report.nodes_exported
    model = onnx.load(str(report.path))
    assert not [n for n in model.graph.node if n.op_type == "Constant"], "constants should be folded into initializers"
    # Only the standard domain: TensorRT's parser must never meet an onnxruntime-private op.
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


def test_fp16_export_runs_and_matches(tiny_model_path, tmp_path):  # noqa: ANN001
    """The graph TensorRT consumes is fp16 (strongly typed build): it must export and run too."""
    from streamnode.diffusion.models import load_components

    c16 = load_components("tiny", device="cpu", dtype="float16")
    report = export_onnx(c16, "unet", tmp_path / "unet16.onnx", batch=2, height=64, width=64)
    model = onnx.load(str(report.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # timestep
    inputs = sample_inputs(c16, "unet", batch=3, height=128, width=64, seed=3)
    err = max_abs_error(c16, "unet", report.path, inputs)
    print(f"unet fp16 B=3 64x128: max abs error {err:.2e}")
    assert err < 2e-2


def test_unknown_component_is_refused(tiny_components, tmp_path):  # noqa: ANN001
    with pytest.raises(ValueError, match="unknown component"):
        export_onnx(tiny_components, "controlnet", tmp_path / "x.onnx")


def test_export_is_what_the_engine_seams_compute(tiny_components):  # noqa: ANN001
    """The exported modules are the engine's seams: same numbers as StreamEngine's eager calls."""
    from streamnode.accel.onnx_export import component_module
    from streamnode.diffusion.stream import StreamEngine

    eng = StreamEngine.from_components(tiny_components, t_index_list=[32], width=64, height=64, cfg_type="none")
    for seam, component in (("unet_call", "unet"), ("vae_encode", "vae_encoder"), ("vae_decode", "vae_decoder")):
        inputs = sample_inputs(tiny_components, component, batch=1, height=64, width=64)
        with torch.no_grad():
            a = component_module(tiny_components, component)(*inputs)
            if component == "unet":
                inputs = (inputs[0], inputs[1].long(), inputs[2])
            b = getattr(eng, seam)(*inputs)
        assert torch.allclose(a, b, atol=1e-5), seam


# -- SDXL: the UNet graph takes the pooled embedding and the size ids -----------------------------


def test_sdxl_unet_export_matches_pytorch_and_takes_the_extra_conditioning(tiny_sdxl_components, tmp_path):  # noqa: ANN001
    from streamnode.accel.onnx_export import UNET_EXTRA_INPUTS, unet_io_names

    c = tiny_sdxl_components
    report = export_onnx(c, "unet", tmp_path / "unet.onnx", batch=2, height=64, width=64)
    model = onnx.load(str(report.path))
    names = tuple(i.name for i in model.graph.input)
    assert names == unet_io_names(c) == (*IO_NAMES["unet"][0], *UNET_EXTRA_INPUTS)
    for tensor in model.graph.input:
        assert tensor.type.tensor_type.shape.dim[0].dim_param, f"{tensor.name}: batch is fixed"
    for batch, height, width in SHAPES:
        inputs = sample_inputs(c, "unet", batch=batch, height=height, width=width, seed=batch)
        assert inputs[3].shape == (batch, c.conditioning.pooled_dim) and inputs[4].shape == (batch, 6)
        err = max_abs_error(c, "unet", report.path, inputs)
        print(f"sdxl unet B={batch} {width}x{height}: max abs error {err:.2e}")
        assert err < FP32_BOUND


def test_sdxl_seam_is_what_the_exported_module_computes(tiny_sdxl_components):  # noqa: ANN001
    """The positional module (ONNX, TensorRT, compile) behind `PositionalUnetCall` equals the engine's
    eager seam called with `added_cond`, and without the extras the SDXL UNet is refused by diffusers."""
    from streamnode.accel.onnx_export import PositionalUnetCall, component_module
    from streamnode.diffusion.stream import StreamEngine

    c = tiny_sdxl_components
    eng = StreamEngine.from_components(c, t_index_list=[32], width=64, height=64, cfg_type="none")
    x, t, emb, text_embeds, time_ids = sample_inputs(c, "unet", batch=2, height=64, width=64)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        a = PositionalUnetCall(component_module(c, "unet"))(x, t, emb, added_cond=added)
        b = eng.unet_call(x, t.long(), emb, added_cond=added)
        assert torch.allclose(a, b, atol=1e-5)
        with pytest.raises((TypeError, ValueError)):
            eng.unet_call(x, t.long(), emb)
