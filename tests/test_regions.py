"""Regional prompts (semantic brushes) on the tiny model, CPU, fp32, 64×64.

Latents are compared before the VAE decoder (the `vae_decode` seam) and brush x0 are computed
by hand from separate UNet calls and the schedule's scalars, independently of the engine's own
fusion code.
"""

from __future__ import annotations

import math
import zlib

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnode.diffusion import regions as regions_module
from streamnode.diffusion.regions import (
    MaskError,
    circle_mask,
    cover_weights,
    latent_coverage,
    load_mask_png,
    mask_from_array,
    quantize,
    rect_mask,
    soften,
)
from streamnode.diffusion.stream import StreamEngine

SIZE = 64
TOL = 1e-4
T_INDEX = {1: [32], 2: [20, 45], 3: [10, 30, 45]}
ALL = np.ones((SIZE, SIZE), np.float32)


def make_engine(components, *, steps=2, frames=1, cfg="none", prompt="a red fox", **kw) -> StreamEngine:  # noqa: ANN001
    engine = StreamEngine.from_components(
        components, t_index_list=kw.pop("t_index_list", T_INDEX[steps]), width=SIZE, height=SIZE,
        frame_buffer_size=frames, cfg_type=cfg, seed=2, similarity_threshold=0.0, **kw,
    )
    engine.prepare(prompt=prompt, negative_prompt="blurry", guidance_scale=1.6, delta=0.7)
    return engine


def frames_of(frames: int, seed: int) -> torch.Tensor:
    """A smooth float frame (batch) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((frames, 3, 8, 8), generator=g)
    out = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return out if frames > 1 else out[0]


def record(engine: StreamEngine) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """Every latent handed to the decoder, and every UNet call's (x, t, emb, out)."""
    latents: list[torch.Tensor] = []
    calls: list[tuple[torch.Tensor, ...]] = []
    decode, unet = engine.vae_decode, engine.unet_call

    def recording_decode(z: torch.Tensor) -> torch.Tensor:
        latents.append(z.detach().clone())
        return decode(z)

    def recording_unet(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = unet(x, t, emb)
        calls.append((x.clone(), t.clone(), emb.clone(), out.clone()))
        return out

    engine.vae_decode, engine.unet_call = recording_decode, recording_unet
    return latents, calls


def maxdiff(a, b) -> float:  # noqa: ANN001
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def half(side: str) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.float32)
    if side == "left":
        mask[:, : SIZE // 2] = 1
    else:
        mask[:, SIZE // 2 :] = 1
    return mask


def write_png(path, array: np.ndarray) -> str:  # noqa: ANN001
    assert cv2.imwrite(str(path), array)
    return str(path)


# -- mask processing (no model) ------------------------------------------------------------


def test_rect_rasterises_exact_area_coverage() -> None:
    mask = rect_mask(0.1, 0.25, 0.5, 0.5, 64, 32)
    assert mask.shape == (32, 64) and mask.dtype == np.float32
    assert mask.sum() == pytest.approx(0.5 * 64 * 0.5 * 32, abs=1e-3)
    assert mask[8, 6] == pytest.approx(0.6)  # x0 = 6.4: column 6 is 60 % covered
    assert mask[8, 10] == 1.0 and mask[0, 10] == 0.0 and mask[8, 50] == 0.0
    # A rectangle running off the frame is drawn up to the edge.
    assert rect_mask(0.5, 0.0, 1.0, 1.0, 8, 8)[:, 4:].min() == 1.0


def test_circle_is_round_on_any_frame_and_its_area_is_right() -> None:
    mask = circle_mask(0.5, 0.5, 0.25, 128, 64)  # radius 0.25 of the shorter side: 16 px
    assert mask.sum() == pytest.approx(math.pi * 16**2, rel=0.02)
    rows, cols = np.nonzero(mask > 0.5)
    assert cols.max() - cols.min() == pytest.approx(rows.max() - rows.min(), abs=1)
    assert circle_mask(0.5, 0.5, 0.0, 16, 16).max() == 0.0


def test_quantized_masks_let_blurred_edges_grow_in_as_noise_falls() -> None:
    sigmas = [0.9, 0.6, 0.3]
    hard = torch.from_numpy(latent_coverage(half("left"), (8, 8)))
    q = quantize(hard, sigmas)
    assert q.shape == (3, 8, 8) and set(q.unique().tolist()) == {0.0, 1.0}  # a hard mask stays hard
    assert bool((q == hard).all())
    soft = torch.from_numpy(soften(latent_coverage(half("left"), (8, 8)), 1.0, 16.0, 8))
    q = quantize(soft, sigmas)
    # Each stage admits more than the one before; fully in where m ≥ σ_k; the last stage ramps to 0.
    assert bool((q[1:] >= q[:-1]).all()) and bool((q[0] < q[2]).any())
    for k, sigma in enumerate(sigmas):
        assert bool((q[k][soft >= sigma] == 1).all())
    assert torch.allclose(q[2], (soft / 0.3).clamp(0, 1))
    assert torch.allclose(q[1], ((soft - 0.3) / 0.3).clamp(0, 1))
    # mask_strength scales m: a weak brush only enters the clean stages.
    weak = quantize(torch.full((2, 2), 0.5), sigmas)
    assert weak[:, 0, 0].tolist() == pytest.approx([0.0, 2 / 3, 1.0])


def test_cover_weights_sum_to_one_and_later_brushes_cover_earlier_ones() -> None:
    a = torch.tensor([[[1.0, 1.0, 0.0, 0.5]]])  # (T=1, 1, 4)
    b = torch.tensor([[[0.0, 1.0, 1.0, 0.5]]])
    w = cover_weights([a, b])  # layers: global, a, b (b on top)
    assert w.shape == (3, 1, 1, 4)
    assert torch.allclose(w.sum(0), torch.ones(1, 1, 4))
    assert w[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0]  # only a
    assert w[:, 0, 0, 1].tolist() == [0.0, 0.0, 1.0]  # overlap: the later brush
    assert w[:, 0, 0, 2].tolist() == [0.0, 0.0, 1.0]
    assert w[:, 0, 0, 3].tolist() == [0.25, 0.25, 0.5]  # half over half over the global prompt


@settings(max_examples=60, deadline=None)
@given(
    masks=st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=4),
    levels=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4, unique=True),
)
def test_quantized_cover_weights_are_a_partition_and_grow_with_the_stages(masks, levels) -> None:
    sigmas = sorted(levels, reverse=True)
    stages = [quantize(torch.tensor(m).view(2, 2), sigmas) for m in masks]
    for q in stages:
        assert bool(((q >= 0) & (q <= 1)).all()) and bool((q[1:] >= q[:-1]).all())
    w = cover_weights(stages)
    assert bool((w >= 0).all()) and torch.allclose(w.sum(0), torch.ones(len(sigmas), 2, 2), atol=1e-6)
    assert torch.equal(w[-1], stages[-1])  # nothing covers the top brush


def test_png_masks_load_from_grey_alpha_and_16_bit(tmp_path) -> None:  # noqa: ANN001
    grey = np.zeros((20, 30), np.uint8)
    grey[:, :15] = 255
    assert np.array_equal(load_mask_png(write_png(tmp_path / "g.png", grey)), grey / 255.0)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere; the alpha channel holds the painting
    rgba[5:10, :, 3] = 128
    assert load_mask_png(write_png(tmp_path / "a.png", rgba))[7, 0] == pytest.approx(128 / 255)
    deep = np.full((4, 4), 65535, np.uint16)
    assert load_mask_png(write_png(tmp_path / "d.PNG", deep)).min() == 1.0
    # Any size, stretched over the frame onto the latent grid.
    assert latent_coverage(load_mask_png(tmp_path / "g.png"), (8, 8))[:, :4].min() == 1.0


def test_bad_png_masks_are_refused_with_the_reason(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    with pytest.raises(MaskError, match="no such file"):
        load_mask_png(tmp_path / "missing.png")
    for remote in ["http://example.com/m.png", "//server/share/m.png", "\\\\server\\share\\m.png"]:
        with pytest.raises(MaskError, match="local files"):
            load_mask_png(remote)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(MaskError, match="not a file"):
        load_mask_png(tmp_path / "dir.png")
    write_png(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "m.jpg").write_bytes((tmp_path / "m.png").read_bytes())
    with pytest.raises(MaskError, match=r"\.png"):
        load_mask_png(tmp_path / "m.jpg")
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(MaskError, match="signature"):
        load_mask_png(tmp_path / "fake.png")
    # A tiny file that declares 100000×100000 pixels is refused before decoding.
    ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = regions_module.PNG_SIGNATURE + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(MaskError, match="at most 4096"):
        load_mask_png(tmp_path / "bomb.png")
    monkeypatch.setattr(regions_module, "MAX_PNG_BYTES", 10)
    with pytest.raises(MaskError, match="MiB"):
        load_mask_png(tmp_path / "m.png")


def test_mask_arrays_are_checked() -> None:
    assert mask_from_array(np.full((3, 3), 200, np.uint8)).max() == pytest.approx(200 / 255)
    assert mask_from_array(torch.ones(3, 3, 1, dtype=torch.bool)).shape == (3, 3)
    for bad, words in [(np.full((3, 3), np.nan, np.float32), r"\[0, 1\]"), (np.full((3, 3), 2.0), r"\[0, 1\]"),
                       (np.zeros((3, 3, 3)), "H×W"), (np.zeros((3, 3), np.int64), "dtype"), ("x", "array")]:
        with pytest.raises(MaskError, match=words):
            mask_from_array(bad)


# -- the engine: equal to the plain engine where it must be ---------------------------------


@pytest.mark.parametrize(("cfg", "frames"), [("none", 1), ("self", 2), ("full", 1), ("initialize", 2)])
def test_full_frame_brush_with_the_global_prompt_equals_the_plain_engine(components, cfg: str, frames: int) -> None:
    plain = make_engine(components, steps=2, frames=frames, cfg=cfg)
    brushed = make_engine(components, steps=2, frames=frames, cfg=cfg)
    brushed.set_brush(0, prompt="a red fox", mask=ALL)
    assert brushed.layers == 2 and brushed.batch_rows == 2 * plain.batch_rows
    seen_plain, _ = record(plain)
    seen_brushed, _ = record(brushed)
    for seed in range(4):
        out_plain, out_brushed = plain(frames_of(frames, seed)), brushed(frames_of(frames, seed))
        assert maxdiff(out_plain, out_brushed) <= TOL
    assert max(maxdiff(a, b) for a, b in zip(seen_plain, seen_brushed, strict=True)) <= TOL


@pytest.mark.parametrize("cfg", ["self", "full"])
def test_empty_disabled_or_zero_strength_brushes_change_nothing_and_cost_no_rows(components, cfg: str) -> None:
    plain = make_engine(components, cfg=cfg)
    brushed = make_engine(components, cfg=cfg)
    brushed.set_brush(0, prompt="flames", mask=np.zeros((SIZE, SIZE), np.float32))  # all-zero mask
    brushed.set_brush(1, prompt="ocean", rect=(0, 0, 1, 1), enabled=False)
    brushed.set_brush(2, prompt="snow", circle=(0.5, 0.5, 0.3), mask_strength=0.0)
    brushed.set_brush(3, prompt="no mask yet")
    assert brushed.regions.active == () and brushed.layers == 1
    assert brushed.batch_rows == plain.batch_rows
    _, calls = record(brushed)
    seen_plain, _ = record(plain)
    for seed in range(3):
        assert np.array_equal(plain(frames_of(1, seed)), brushed(frames_of(1, seed)))
    assert {c[0].shape[0] for c in calls} == {plain.batch_rows}


@pytest.mark.parametrize(("steps", "frames", "cfg"), [(3, 2, "full"), (3, 2, "initialize"), (2, 2, "self"),
                                                       (3, 1, "none")])
def test_stream_with_brushes_equals_the_sequential_reference(components, steps, frames, cfg) -> None:
    """The stream batch (stage-major, frame, layer rows) and the stage-by-stage reference agree."""
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    engine.set_brush(0, prompt="flames", rect=(0, 0, 0.6, 0.6), mask_blur=12)
    engine.set_brush(1, prompt="ocean", negative_prompt="boats", circle=(0.6, 0.7, 0.3), prompt_strength=0.8)
    latents, _ = record(engine)
    for seed in range(3):
        engine(frames_of(frames, 100 + seed))  # unrelated content first, to be flushed
    frame = frames_of(frames, 7)
    out = [engine(frame) for _ in range(steps)][-1]
    stream_latent = latents[-1]
    ref = engine.reference(frame)
    assert maxdiff(out, ref) <= TOL and maxdiff(stream_latent, latents[-1]) <= TOL


# -- layout and fusion, by hand ---------------------------------------------------------


@pytest.mark.parametrize("cfg", ["none", "self", "full", "initialize"])
def test_rows_are_stage_major_then_frame_then_brush(components, cfg: str) -> None:
    T, F = 3, 2
    engine = make_engine(components, steps=T, frames=F, cfg=cfg)
    engine.set_brush(4, prompt="flames", rect=(0, 0, 0.5, 0.5), prompt_strength=1.0)
    engine.set_brush(1, prompt="ocean", rect=(0, 0.5, 1, 0.5), prompt_strength=1.0)
    P = 3
    B = T * F
    assert engine.regions.active == (4, 1) and engine.layers == P
    assert engine.batch_rows == {"none": B, "self": B, "full": 2 * B, "initialize": B + F}[cfg] * P
    _, calls = record(engine)
    engine(frames_of(F, 1))  # warm start: T − 1 silent calls, then the real one, all the same shape
    engine(frames_of(F, 2))
    assert [c[0].shape[0] for c in calls] == [engine.batch_rows] * (T + 1)
    x, t, emb, _ = calls[-1]
    n_neg = engine.negative_rows
    encode = components.encode_text
    negative_g, positive_g = encode(["blurry"]), encode(["a red fox"])
    layers = [positive_g[0], encode(["flames"])[0], encode(["ocean"])[0]]
    stream = slice(n_neg, None)
    timesteps = engine.schedule.timesteps
    for r in range(B * P):
        k, f, p = r // (F * P), (r // P) % F, r % P
        assert int(t[stream][r]) == int(timesteps[k]), r
        assert maxdiff(emb[stream][r], layers[p]) <= 1e-5, r
        assert torch.equal(x[stream][r], x[stream][(k * F + f) * P]), r  # every layer sees the same latent
    for r in range(n_neg):  # negative rows: the first n_neg stream rows again, with the negative prompt
        assert torch.equal(x[r], x[stream][r]) and int(t[r]) == int(t[stream][r])
        assert maxdiff(emb[r], negative_g[0]) <= 1e-5  # brushes without a negative use the global one


def lcm_x0(engine: StreamEngine, x: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
    """x0 = c_out·(X − b·ε)/a + c_skip·X from the schedule's own scalars (float64)."""
    s = engine.schedule
    a, b = float(s.alpha[k]), float(s.beta[k])
    return (float(s.c_out[k]) * (x.double() - b * eps.double()) / a + float(s.c_skip[k]) * x.double()).float()


def test_two_brushes_on_disjoint_halves_take_their_own_x0_where_their_mask_is_one(components) -> None:
    T = 2
    engine = make_engine(components, steps=T, cfg="none")
    engine.set_brush(0, prompt="flames", mask=half("left"), prompt_strength=1.0)
    engine.set_brush(1, prompt="ocean", rect=(0.5, 0.0, 0.5, 0.5), prompt_strength=1.0)  # top right
    _, calls = record(engine)
    for seed in range(3):
        engine(frames_of(1, seed))
    x, t, _, _ = calls[-1]
    fused = engine._x0_prev  # x0 of every stage, as carried to the next call
    P = engine.layers
    own = {"a red fox": 0, "flames": 1, "ocean": 2}
    weights = engine.regions.weights  # (P, T, h, w)
    for k in range(T):
        latent = x[k * P : k * P + 1]  # the stage's latent (layer 0's row; all layers share it)
        for prompt, p in own.items():
            eps = components.unet(latent, t[k * P : k * P + 1], encoder_hidden_states=components.encode_text([prompt]),
                                  return_dict=False)[0]
            mine = lcm_x0(engine, latent, eps, k)[0]
            where = weights[p, k] == 1
            assert int(where.sum()) > 0
            assert maxdiff(fused[k][:, where], mine[:, where]) <= TOL, (prompt, k)
    left, top_right = engine.regions.stage_masks(0), engine.regions.stage_masks(1)
    assert bool((left[:, :, :4] == 1).all()) and bool((left[:, :, 4:] == 0).all())
    assert bool((top_right[:, :4, 4:] == 1).all()) and float(top_right.sum()) == T * 16
    # The bottom-right quarter no brush covers follows the global prompt.
    assert bool((weights[0, :, 4:, 4:] == 1).all())


def test_later_brushes_cover_earlier_ones_and_reordering_swaps_them(components) -> None:
    engine = make_engine(components, cfg="none")
    engine.set_brush(0, prompt="flames", rect=(0, 0, 0.75, 1))
    engine.set_brush(1, prompt="ocean", rect=(0.25, 0, 0.75, 1))
    overlap = (slice(None), slice(2, 6))
    w = engine.regions.weights
    assert engine.regions.order == (0, 1)
    assert bool((w[2][:, overlap[0], overlap[1]] == 1).all())  # brush 1, on top, wins the overlap
    engine.reorder_brushes([1, 0])
    w = engine.regions.weights
    assert engine.regions.active == (1, 0) and bool((w[2][:, :, 2:6] == 1).all())  # brush 0 now on top
    engine.update(brush=(1, "order", 1))  # move brush 1 back on top
    assert engine.regions.order == (0, 1)
    with pytest.raises(ValueError, match="every brush number once"):
        engine.reorder_brushes([0])
    with pytest.raises(ValueError, match="cover position"):
        engine.update(brush=(0, "order", 5))


def test_prompt_strength_mixes_the_embedding_toward_the_global_prompt(components) -> None:
    engine = make_engine(components, cfg="self")
    engine.set_brush(2, prompt="flames", rect=(0, 0, 1, 1), prompt_strength=0.3)
    _, calls = record(engine)
    engine(frames_of(1, 0))
    emb = calls[-1][2]
    e_g, e_b = components.encode_text(["a red fox"]), components.encode_text(["flames"])
    assert maxdiff(emb[1], e_g[0] + 0.3 * (e_b[0] - e_g[0])) <= 1e-5
    assert maxdiff(emb[0], e_g[0]) <= 1e-6


# -- live edits -------------------------------------------------------------------------


def test_editing_one_brush_re_encodes_only_its_prompt_and_re_masks_only_it(components, monkeypatch) -> None:
    engine = make_engine(components, cfg="none")
    engine.set_brush(0, prompt="flames", rect=(0, 0, 0.5, 0.5))
    engine.set_brush(1, prompt="ocean", negative_prompt="boats", rect=(0, 0.5, 1, 0.5))
    engine(frames_of(1, 0))
    encodes = engine.stats["text_encodes"]
    texts: list[str] = []
    encode = engine._prompts._encode
    monkeypatch.setattr(engine._prompts, "_encode", lambda batch: (texts.extend(batch), encode(batch))[1])
    softened: list[float] = []
    soften_ = regions_module.soften
    monkeypatch.setattr(regions_module, "soften", lambda c, s, b, k: (softened.append(b), soften_(c, s, b, k))[1])

    engine.update(brush=(1, "prompt", "lava"))
    assert texts == ["lava"] and engine.stats["text_encodes"] == encodes + 1 and softened == []
    engine.update(brush=(1, "prompt", "ocean"))  # back to a prompt seen before: the cache serves it
    engine.update(brush=(0, "mask_blur", 4.0))
    engine.update(brush=(0, "rect", (0.1, 0.1, 0.3, 0.3)))
    engine.update(brush=(0, "mask_strength", 0.8))
    engine.update(brush=(0, "enabled", False))
    engine.update(brush=(0, "enabled", True))
    assert texts == ["lava"] and softened == [4.0, 4.0, 4.0]  # one brush's mask, once per mask edit
    before = engine.stats["unet_calls"]
    engine(frames_of(1, 1))
    assert engine.stats["unet_calls"] == before + 1 and engine.stats["warm_fills"] == 1  # never flushed


def test_adding_and_removing_brushes_mid_stream_never_flushes_and_rows_follow(components) -> None:
    T = 2
    plain = make_engine(components, steps=T, cfg="self")
    engine = make_engine(components, steps=T, cfg="self")
    plain_latents, _ = record(plain)
    latents, calls = record(engine)
    frame = frames_of(1, 3)
    engine(frame)
    plain(frame)
    assert engine.batch_rows == T
    engine.set_brush(5, prompt="flames", circle=(0.3, 0.3, 0.25))
    engine(frame)
    plain(frame)
    assert calls[-1][0].shape[0] == 2 * T and engine.stats["warm_fills"] == 1
    # It shows at once, in the circle (the rest moves a little: every layer sees the whole latent).
    change = (latents[-1] - plain_latents[-1]).abs().mean(dim=(0, 1))
    mask = engine.regions.mask(5)
    assert float(change[mask > 0.5].mean()) > 8 * float(change[mask == 0].mean())
    engine.set_brush(6, prompt="ocean", rect=(0, 0.6, 1, 0.4))
    engine(frame)
    assert calls[-1][0].shape[0] == 3 * T
    engine.clear_brush(5)
    engine.update(brush=(6, "enabled", False))
    assert engine.batch_rows == T and engine.regions.order == (6,)
    outs = [engine(frame) for _ in range(T)]
    assert calls[-1][0].shape[0] == T and engine.stats["warm_fills"] == 1
    # After T frames without brushes every stage has been recomputed without them.
    assert maxdiff(outs[-1], plain.reference(frame)) <= TOL


def test_t_index_changes_with_brushes_requantize_and_keep_rows_right(components) -> None:
    engine = make_engine(components, steps=2, cfg="self")
    engine.set_brush(0, prompt="flames", rect=(0, 0, 0.5, 1), mask_blur=10)
    assert engine.regions.stage_masks(0).shape[0] == 2
    engine(frames_of(1, 0))
    engine.update(t_index_list=[10, 30, 45])
    assert engine.regions.stage_masks(0).shape[0] == 3 and engine.batch_rows == 6
    frame = frames_of(1, 4)
    out = [engine(frame) for _ in range(3)][-1]
    assert maxdiff(out, engine.reference(frame)) <= TOL


def test_global_prompt_transitions_carry_the_brush_layers_along(components) -> None:
    engine = make_engine(components, cfg="none", prompt_transition_frames=2)
    engine.set_brush(0, prompt="flames", rect=(0, 0, 1, 1), prompt_strength=0.5)
    _, calls = record(engine)
    engine(frames_of(1, 0))
    engine.update(prompt="a blue whale")
    engine(frames_of(1, 0))
    engine(frames_of(1, 0))
    e_g, e_b = components.encode_text(["a blue whale"])[0], components.encode_text(["flames"])[0]
    assert maxdiff(calls[-1][2][1], e_g + 0.5 * (e_b - e_g)) <= 1e-5


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ((8, "prompt", "x"), "use 0..7"),
        ((0, "colour", 1), "unknown brush field"),
        ((0, "shm", "shm://x"), "read by the node"),
        ((0, "rect", (0, 0, 2, 1)), "0..1"),
        ((0, "mask_blur", -1.0), "mask_blur"),
        ((0, "prompt", 3), "prompt"),
        ((0, {"rect": (0, 0, 1, 1), "circle": (0.5, 0.5, 0.1)}), "one mask source"),
        ((0, "mask", "/no/such/mask.png"), "no such file"),
        ((0, "mask", "/etc/hostname"), ".png"),
        ((3, "clear", None), "does not exist"),
        ((0, "clear"), "index, field, value"),
        ((True, "prompt", "x"), "integer"),
    ],
)
def test_bad_brush_edits_are_rejected_and_change_nothing(components, edit, words) -> None:
    engine = make_engine(components, cfg="none")
    engine.set_brush(0, prompt="flames", rect=(0, 0, 0.5, 0.5))
    encodes, before = engine.stats["text_encodes"], engine.regions.mask(0)
    with pytest.raises(ValueError, match=words):
        engine.update(brush=edit)
    assert engine.regions.brushes[0].params.prompt == "flames" and torch.equal(engine.regions.mask(0), before)
    assert engine.stats["text_encodes"] == encodes and engine.layers == 2


def test_a_failed_edit_with_several_fields_applies_none_of_them(components) -> None:
    engine = make_engine(components, cfg="none")
    encodes = engine.stats["text_encodes"]
    with pytest.raises(MaskError):
        engine.set_brush(0, prompt="flames", mask="/no/such/mask.png")
    assert engine.regions.brushes == {} and engine.stats["text_encodes"] == encodes  # the mask failed first


def test_png_array_and_shape_masks_land_on_the_latent_grid(components, tmp_path) -> None:  # noqa: ANN001
    engine = make_engine(components, cfg="none")
    png = np.zeros((128, 128), np.uint8)  # twice the frame size: stretched over it
    png[:64, :] = 255
    engine.set_brush(0, mask=write_png(tmp_path / "top.png", png))
    assert engine.regions.brushes[0].params.mask.endswith("top.png")
    assert torch.equal(engine.regions.mask(0), torch.tensor([[1.0] * 8] * 4 + [[0.0] * 8] * 4))
    engine.set_brush(0, rect=(0.5, 0.5, 0.5, 0.5))
    assert engine.regions.brushes[0].params.rect == (0.5, 0.5, 0.5, 0.5) and engine.regions.brushes[0].params.mask is None
    assert float(engine.regions.mask(0).sum()) == 16 and float(engine.regions.mask(0)[4:, 4:].min()) == 1
    engine.set_brush(0, mask=None)  # no mask: the brush stays but costs nothing
    assert engine.regions.mask(0) is None and engine.layers == 1
