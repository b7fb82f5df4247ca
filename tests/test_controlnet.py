"""ControlNets on the stream batch (diffusion/controlnet.py), tiny model, CPU, fp32, 64×64.

The nets are made from the tiny UNet with `ControlNetModel.from_unet` and their zero-initialised
output convolutions randomised (tiny_controlnet.random_controlnet): with the real zero init every
residual is 0 and every test here would pass whatever the engine did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import maxdiff, record_latents

from streamnode.accel import GuardedCall
from streamnode.diffusion.control_maps import make_map
from streamnode.diffusion.stream import StreamEngine
from streamnode.diffusion.tiny_controlnet import random_controlnet

SIZE = 64
TOL = 1e-4
T_INDEX = {1: [32], 2: [20, 45], 4: [5, 20, 32, 45]}


@pytest.fixture(scope="module")
def nets(components, tmp_path_factory) -> list[str]:  # noqa: ANN001
    """Two random ControlNets for the tiny UNet, saved as diffusers folders (safetensors)."""
    folders = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"controlnet{seed}")
        random_controlnet(components.unet, seed).save_pretrained(folder, safe_serialization=True)
        folders.append(str(folder))
    return folders


def make_engine(components, *, steps=2, frames=1, cfg="self", **kw) -> StreamEngine:  # noqa: ANN001
    engine = StreamEngine.from_components(
        components, t_index_list=T_INDEX[steps], width=SIZE, height=SIZE, frame_buffer_size=frames, cfg_type=cfg,
        similarity_threshold=0.0, seed=2, **kw,
    )
    engine.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.6, delta=0.7)
    return engine


def float_frames(frames: int, seed: int) -> torch.Tensor:
    """Smooth float frames (F, 3, H, W) in [0, 1], or (3, H, W) for one."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((frames, 3, 8, 8), generator=g)
    out = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return out if frames > 1 else out[0]


def record_control(engine: StreamEngine) -> list[object]:
    """Every `control` the UNet seam receives (None when the call had none)."""
    seen: list[object] = []
    unet = engine.unet_call

    def recording(x, t, emb, **kw):  # noqa: ANN001, ANN003, ANN202
        control = kw.get("control")
        seen.append(None if control is None else (tuple(d.clone() for d in control[0]), control[1].clone()))
        return unet(x, t, emb, **kw)

    engine.unet_call = recording
    return seen


# -- the stream batch with ControlNets equals the step-by-step reference -------------------


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_stream_with_controlnets_equals_reference_and_each_frame_keeps_its_map(
    components, nets, steps: int, frames: int, cfg: str
) -> None:
    """Distinct frames with distinct maps: the frame leaving at call j + T − 1 is reference(frame j),
    which holds only if every row used the map of its own frame at every stage."""
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    engine.update(controlnet=(0, {"model": nets[0], "map": "edges-soft", "scale": 0.7}))
    latents = record_latents(engine)
    inputs = [float_frames(frames, seed=100 + i) for i in range(steps + 1)]
    for frame in inputs:
        engine(frame)
    streamed = list(latents)  # call c decodes the x0 of the frames that entered at call c − (T − 1)
    for j in (0, 1):
        engine.reference(inputs[j])
        assert maxdiff(streamed[j + steps - 1], latents[-1]) <= TOL


@pytest.mark.parametrize(("steps", "frames", "cfg"), [(2, 2, "full"), (4, 1, "initialize")])
def test_stream_with_controlnets_and_brushes_equals_reference(components, nets, steps, frames, cfg) -> None:
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    engine.update(controlnet=(0, {"model": nets[0], "map": "passthrough"}))
    engine.set_brush(0, prompt="flames", rect=(0.0, 0.0, 0.5, 1.0))
    engine.set_brush(1, prompt="ice", circle=(0.7, 0.5, 0.3))
    frame = float_frames(frames, seed=7)
    for seed in range(2):
        engine(float_frames(frames, seed=50 + seed))
    outs = [engine(frame) for _ in range(steps)]
    assert maxdiff(outs[-1], engine.reference(frame)) <= TOL


@pytest.mark.parametrize("cfg", ["full", "self"])
def test_stream_with_controlnets_and_the_feature_bank_equals_reference(components, nets, cfg) -> None:
    """Both extras of the one UNet call at once: each row's residuals and its stage's bank rows."""
    engines = [make_engine(components, steps=2, frames=1, cfg=cfg) for _ in range(2)]
    for engine in engines:
        engine.update(feature_bank=True, feature_fusion=0.0, feature_bank_interval=600)
    engine = engines[0]
    try:
        engine.update(controlnet=(0, {"model": nets[0], "map": "edges-soft", "scale": 0.7}))
        frame = float_frames(1, seed=7)
        outs = []
        for e in engines:
            e(float_frames(1, seed=100))  # written into the bank, which then stays
            outs.append([e(frame) for _ in range(2)][-1])
        assert engine.feature_bank.filled == 1
        assert maxdiff(outs[0], outs[1]) > 1e-2  # the net acts
        assert maxdiff(outs[0], engine.reference(frame)) <= TOL
    finally:
        for e in engines:
            e.close()  # the bank's processors sit on the shared UNet until then


# -- what a user notices -------------------------------------------------------------------


def test_scale_zero_is_no_controlnet_and_a_scale_changes_the_output(components, nets) -> None:
    frame = float_frames(1, seed=3)
    plain = make_engine(components)
    plain_latents = record_latents(plain)
    plain(frame)
    engine = make_engine(components)
    latents = record_latents(engine)
    engine.update(controlnet=(0, {"model": nets[0], "map": "edges-soft", "scale": 0.0}))
    engine(frame)
    assert maxdiff(latents[-1], plain_latents[-1]) <= TOL
    assert engine.controlnets.stats["controlnet_calls"] == 0  # scale 0: the net is not evaluated
    engine.update(controlnet=(0, "scale", 1.0))
    engine.prepare()
    engine(frame)
    assert engine.controlnets.stats["controlnet_calls"] == 2  # warm fill + the call: once per UNet call
    spread = float(plain_latents[-1].abs().mean())
    assert maxdiff(latents[-1], plain_latents[-1]) > 0.05 * spread


def test_residuals_reach_the_unet_for_every_row_within_the_stage_range(components, nets) -> None:
    engine = make_engine(components, steps=2, frames=2, cfg="full")
    seen = record_control(engine)
    engine.update(controlnet=(0, {"model": nets[0], "map": "passthrough"}))
    engine(float_frames(2, seed=4))
    down, mid = seen[-1]
    assert mid.shape[0] == engine.batch_rows == 8
    per_row = torch.stack([d.abs().flatten(1).sum(1) for d in (*down, mid)]).sum(0)
    assert bool((per_row > 1e-3).all()), per_row
    # guidance start 0.5 of 2 stages: stage 0's rows (negatives: the first stream rows) get none.
    engine.update(controlnet=(0, "start", 0.5))
    engine(float_frames(2, seed=5))
    down, mid = seen[-1]
    per_row = torch.stack([d.abs().flatten(1).sum(1) for d in (*down, mid)]).sum(0)
    stage = engine._unet_stage  # noqa: SLF001 - the row layout under test
    assert bool((per_row[stage == 0] == 0).all()) and bool((per_row[stage == 1] > 1e-3).all())


def test_two_nets_add_their_residuals(components, nets) -> None:
    frame = float_frames(1, seed=6)
    results = []
    for setup in ([0], [1], [0, 1]):
        engine = make_engine(components, steps=1)
        seen = record_control(engine)
        for index in setup:
            engine.update(controlnet=(index, {"model": nets[index], "map": "luma"}))
        engine(frame)
        results.append(seen[-1])
    (a_down, a_mid), (b_down, b_mid), (ab_down, ab_mid) = results
    assert maxdiff(ab_mid, a_mid + b_mid) <= TOL
    assert all(maxdiff(ab, a + b) <= TOL for ab, a, b in zip(ab_down, a_down, b_down, strict=True))


def test_no_usable_net_calls_the_unet_as_without_controlnets(components, nets) -> None:
    engine = make_engine(components)
    seen = record_control(engine)
    engine.update(controlnet=(0, {"model": nets[0], "map": "shm://nothing-yet"}))  # no map yet
    engine.update(controlnet=(1, {"model": nets[1], "enabled": False}))
    engine(float_frames(1, seed=1))
    assert seen and all(c is None for c in seen)
    assert engine.controlnets.stats["controlnet_calls"] == 0


def test_an_external_map_is_used_from_the_next_call_and_held(components, nets) -> None:
    engine = make_engine(components, steps=1)
    latents = record_latents(engine)
    engine.update(controlnet=(0, {"model": nets[0], "map": "shm://td-depth"}))
    frame = float_frames(1, seed=8)
    engine(frame)
    no_map = latents[-1]
    ramp = np.repeat(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], SIZE, axis=0).repeat(3, axis=2)
    engine.set_control_map(0, ramp)
    engine(frame)
    with_ramp = latents[-1]
    engine(frame)
    assert maxdiff(latents[-1], with_ramp) <= TOL  # the last map holds
    checker = np.kron((np.indices((8, 8)).sum(0) % 2).astype(np.uint8) * 255, np.ones((8, 8), np.uint8))
    engine.set_control_map(0, checker)
    engine(frame)
    assert maxdiff(with_ramp, no_map) > 1e-2 and maxdiff(latents[-1], with_ramp) > 1e-2
    with pytest.raises(ValueError, match="fit it first"):
        engine.set_control_map(0, np.zeros((32, 32, 3), np.uint8))


def test_residuals_reused_for_n_frames_cost_fewer_net_calls(components, nets) -> None:
    engine = make_engine(components, steps=1)
    engine.update(controlnet=(0, {"model": nets[0], "map": "edges-soft", "reuse": 3}))
    for i in range(6):
        engine(float_frames(1, seed=i))
    stats = engine.controlnets.stats
    assert (stats["controlnet_calls"], stats["controlnet_reused"]) == (2, 4)


def test_builtin_maps(components) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, SIZE, SIZE), generator=g) * 2 - 1
    flat = torch.zeros((1, 3, SIZE, SIZE))
    for name in ("passthrough", "luma", "edges-soft", "canny"):
        out = make_map(name, image)
        assert out.shape == (1, 3, SIZE, SIZE) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(make_map("edges-soft", flat).max()) == 0.0 and float(make_map("canny", flat).max()) == 0.0
    assert float(make_map("canny", image).max()) == 1.0  # random noise is all edges
    assert maxdiff(make_map("luma", flat), torch.full((1, 3, SIZE, SIZE), 0.5)) <= 1e-6


# -- refused with one line, the engine unchanged ------------------------------------------


def test_a_bad_net_is_refused_with_one_line_and_the_engine_goes_on(components, nets, tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    other = ControlNetModel(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32, layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16, 16, 16),
    )
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    (tmp_path / "net.ckpt").write_bytes(b"x")
    engine = make_engine(components)
    frame = float_frames(1, seed=9)
    before = engine(frame)
    cases = [
        (str(tmp_path / "other"), "another base model: its cross-attention width is 32"),
        (str(tmp_path / "missing"), "no such file or folder"),
        (str(tmp_path / "net.ckpt"), "safetensors only"),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            engine.update(controlnet=(0, "model", model))
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="0..3"):
        engine.update(controlnet=(4, "model", nets[0]))
    with pytest.raises(ValueError, match="map"):
        engine.update(controlnet=(0, "map", "sobel"))
    assert engine.live_params().controlnets == {}
    assert maxdiff(engine(frame), before) <= TOL


def test_accelerated_unet_without_residual_inputs_falls_back_for_controlnet_calls(components, nets) -> None:
    engine = make_engine(components, steps=1)
    original = engine.unet_call
    fast_calls = []

    def fast(x, t, emb, **kw):  # noqa: ANN001, ANN003, ANN202
        fast_calls.append(kw)
        return original(x, t, emb, **kw)

    engine.unet_call = GuardedCall("unet_call", "test", fast, original)
    frame = float_frames(1, seed=10)
    engine(frame)
    engine.update(controlnet=(0, {"model": nets[0], "map": "luma"}))
    engine(frame)
    assert len(fast_calls) == 1 and engine.unet_call.fallback_calls == 1 and engine.unet_call.broken is None
    engine.update(controlnet=(0, "clear", None))
    engine(frame)
    assert len(fast_calls) == 2


# -- maps that need weights: a depth model through transformers --------------------------------


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory) -> str:
    """A tiny random Depth Anything model (a 4-layer DINOv2 backbone) saved as a transformers folder."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    folder = tmp_path_factory.mktemp("depth")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        DepthAnythingForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=False, do_pad=False).save_pretrained(folder)
    return str(folder)


def test_depth_maps_come_from_a_depth_model_loaded_on_first_use(components, nets, depth_folder) -> None:
    image = float_frames(2, seed=11) * 2 - 1
    depth = make_map(f"depth:{depth_folder}", image)
    assert depth.shape == (2, 3, SIZE, SIZE)
    assert float(depth.amin()) == 0.0 and abs(float(depth.amax()) - 1.0) < 1e-5  # normalised per frame
    with pytest.raises(ValueError, match="depth model /nowhere/depth: cannot load it") as info:
        make_map("depth:/nowhere/depth", image)
    assert "\n" not in str(info.value)
    # The engine never loads a depth model itself: the net waits for its map from outside.
    engine = make_engine(components, steps=1)
    engine.update(controlnet=(0, {"model": nets[0], "map": f"depth:{depth_folder}"}))
    frame = float_frames(1, seed=12)
    engine(frame)
    assert engine.controlnets.stats["controlnet_calls"] == 0
    engine.set_control_map(0, make_map(f"depth:{depth_folder}", frame[None] * 2 - 1)[0])
    engine(frame)
    assert engine.controlnets.stats["controlnet_calls"] == 1


def test_a_safetensors_file_beside_its_config_loads_like_its_folder(components, nets) -> None:
    frame = float_frames(1, seed=13)
    outs = []
    for model in (nets[0], str(Path(nets[0]) / "diffusion_pytorch_model.safetensors")):
        engine = make_engine(components, steps=1)
        latents = record_latents(engine)
        engine.update(controlnet=(0, {"model": model, "map": "luma"}))
        engine(frame)
        outs.append(latents[-1])
    assert maxdiff(outs[0], outs[1]) <= TOL
