"""Temporal consistency on the tiny model (CPU, fp32, 64×64): the feature bank and the smoothing.

The bank's attention is checked against attention written out by hand; the engine with the bank
against itself without it (off = today's engine, empty = plain attention) and against its own
step-by-step reference holding the same bank; the stateless export against the eager bank
through onnxruntime. Smoothing is checked on the latents handed to the decoder.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_engine import SIZE, TOL, float_frames, make_engine, maxdiff, record_latents

from streamnode.diffusion.feature_bank import (
    FeatureBank,
    _BankedProcessor,
    attention_bias,
    banked_attention,
    self_attention_layers,
)
from streamnode.diffusion.motion import MOTION_HIGH

BANK = {"feature_bank": True, "feature_fusion": 0.0}
QUADRANT = (slice(0, SIZE // 2), slice(0, SIZE // 2))  # the image's top-left quarter


def scene(frames: int = 1, seed: int = 5) -> torch.Tensor:
    """A still scene (F, 3, H, W) in [0.2, 0.6] (the same image F times): a patch of 1.0 painted on
    it, or the lights going out, moves every block by ≥ 0.4 in the VAE's units, far above MOTION_HIGH."""
    return 0.2 + 0.4 * float_frames(1, seed).expand(frames, -1, -1, -1)


def with_patch(frames: torch.Tensor, area: tuple[slice, slice] = QUADRANT) -> torch.Tensor:
    """The frames with a white patch over `area` (rows, columns): a real change there alone."""
    patched = frames.clone()
    patched[..., area[0], area[1]] = 1.0
    return patched


def processors(unet: torch.nn.Module) -> list[object]:
    return [layer.module.processor for layer in self_attention_layers(unet)]


# -- the attention itself -----------------------------------------------------------------


def attention_by_hand(attn, hidden: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """softmax(Q·Kᵀ/√d)·V per head, the keys and values projected from `keys_from`, then to_out."""
    q, k, v = attn.to_q(hidden), attn.to_k(keys_from), attn.to_v(keys_from)
    heads = attn.heads
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / d**0.5, dim=-1)
        out[..., cols] = weights @ v[..., cols]
    return attn.to_out[0](out)


@pytest.fixture(scope="module")
def attn1(components):  # noqa: ANN001, ANN201
    return self_attention_layers(components.unet)[0].module


def test_banked_attention_attends_to_the_earlier_frames_tokens(attn1) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    rows, tokens, channels = 2, 16, attn1.to_k.in_features
    now, before, never = (torch.randn(rows, tokens, channels, generator=g) for _ in range(3))
    with torch.no_grad():
        k_before, v_before, o_before = attn1.to_k(before), attn1.to_v(before), attn1.to_out[0](before)
        # Bank of 2 slots: `before` written, slot 1 never written (garbage that must not count).
        bank = tuple(torch.cat([x, attn1.to_k(never)], dim=1) for x in (k_before, v_before, o_before))
        valid = torch.zeros(rows, 2, tokens, dtype=torch.bool)
        valid[:, 0] = True
        out, (k, v, o) = banked_attention(attn1, now, bank, attention_bias(valid, written=1), fusion=0.0, threshold=1.0)
        expected = attention_by_hand(attn1, now, torch.cat([now, before], dim=1))
        plain = attention_by_hand(attn1, now, now)
        assert maxdiff(out, expected) <= 1e-5
        assert maxdiff(out, plain) > 100 * 1e-5  # the bank really changes the attention
        assert maxdiff(k, attn1.to_k(now)) == 0.0 and maxdiff(o, out) == 0.0
        # Validity is per row and token: row 0 forgets the first half of `before`, whose place the
        # new frame's own tokens take (as if the bank held this frame there); row 1 keeps it all.
        half = tokens // 2
        valid[0, 0, :half] = False
        out, _ = banked_attention(attn1, now, bank, attention_bias(valid, written=1), fusion=0.0, threshold=1.0)
        stand_in = attention_by_hand(attn1, now[:1], torch.cat([now[:1], before[:1, half:], now[:1, :half]], dim=1))
        assert maxdiff(out[:1], stand_in) <= 1e-5 and maxdiff(out[1:], expected[1:]) <= 1e-5
        assert maxdiff(out[:1], expected[:1]) > 100 * 1e-5
        # A bank holding this very frame changes nothing (duplicated keys keep the softmax weights).
        same = tuple(x.repeat(1, 2, 1) for x in (attn1.to_k(now), attn1.to_v(now), plain))
        out_same, _ = banked_attention(attn1, now, same, None, fusion=0.0, threshold=1.0)
        assert maxdiff(out_same, plain) <= 1e-5


def test_fusion_pulls_each_token_to_its_most_similar_banked_output(attn1) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    rows, tokens, channels = 1, 16, attn1.to_k.in_features
    now = torch.randn(rows, tokens, channels, generator=g)
    with torch.no_grad():
        plain, _ = banked_attention(attn1, now, None, None, fusion=0.0, threshold=0.0)
        # The banked outputs: this frame's own outputs, shuffled and slightly disturbed.
        order = torch.randperm(tokens, generator=g)
        banked_o = plain[:, order] + 0.01 * torch.randn(rows, tokens, channels, generator=g)
        kv = attn1.to_k(now), attn1.to_v(now)
        bank = (*kv, banked_o)
        half, _ = banked_attention(attn1, now, bank, None, fusion=0.5, threshold=0.9)
        # Each token's nearest banked output is its own disturbed copy: halfway there.
        nearest = banked_o[:, torch.argsort(order)]
        assert maxdiff(half, 0.5 * plain + 0.5 * nearest) <= 1e-5
        assert maxdiff(half, plain) > 1e-3
        # Above every similarity: no fusion at all.
        none, _ = banked_attention(attn1, now, bank, None, fusion=1.0, threshold=1.0 + 1e-6)
        assert maxdiff(none, plain) <= 1e-5


# -- the engine ---------------------------------------------------------------------------


def test_bank_off_is_todays_engine_and_installs_nothing(components) -> None:  # noqa: ANN001
    unet = components.unet
    originals = processors(unet)
    assert not any(isinstance(p, _BankedProcessor) for p in originals)
    plain = make_engine(components)
    plain.prepare(prompt="a red fox")
    engine = make_engine(components)
    engine.prepare(prompt="a red fox", **BANK)
    assert all(isinstance(p, _BankedProcessor) for p in processors(unet))
    # An engine sharing the UNet that does not use the bank gets plain attention meanwhile.
    first = [plain(float_frames(1, seed)[0]) for seed in range(2)]
    for seed in range(3):
        engine(float_frames(1, 10 + seed)[0])
    engine.prepare(feature_bank=False)
    assert processors(unet) == originals and engine.feature_bank is None
    fresh = make_engine(components)
    fresh.prepare(prompt="a red fox")
    for seed in range(2):
        assert maxdiff(fresh(float_frames(1, seed)[0]), first[seed]) <= TOL
        assert maxdiff(engine(float_frames(1, seed)[0]), first[seed]) <= TOL
    engine.close()


def test_engines_sharing_a_unet_keep_their_banks_apart(components) -> None:  # noqa: ANN001
    originals = processors(components.unet)
    first, second = make_engine(components), make_engine(components)
    first.prepare(prompt="a red fox", **BANK)
    second.prepare(prompt="a red fox", **BANK, feature_bank_size=2)
    frame = float_frames(1, 3)[0]
    first(frame)
    second(frame)
    assert first.feature_bank.filled == second.feature_bank.filled == 1
    first.close()  # the other engine's bank stays installed and in use
    assert all(isinstance(p, _BankedProcessor) for p in processors(components.unet))
    alone = make_engine(components)
    alone.prepare(prompt="a red fox", **BANK, feature_bank_size=2)
    alone(frame)
    assert maxdiff(second(float_frames(1, 4)[0]), alone(float_frames(1, 4)[0])) <= TOL
    second.close()
    alone.close()
    assert processors(components.unet) == originals


def test_an_empty_bank_is_plain_attention_and_it_fills_every_interval(components) -> None:  # noqa: ANN001
    plain = make_engine(components)
    plain.prepare(prompt="a red fox")
    engine = make_engine(components)
    engine.prepare(prompt="a red fox", **BANK, feature_bank_size=2, feature_bank_interval=2)
    frames = [float_frames(1, seed)[0] for seed in range(6)]
    filled = []
    diffs = []
    for frame in frames:
        diffs.append(maxdiff(engine(frame), plain(frame)))
        filled.append(engine.feature_bank.filled)
    # Written at processed calls 0, 2, 4 (every 2nd), a ring of 2 slots.
    assert filled == [1, 1, 2, 2, 2, 2]
    assert diffs[0] <= TOL  # the first frame saw an empty bank
    # A new layout (T) empties the bank; so does prepare().
    engine.update(t_index_list=[10, 30, 45])
    assert engine.feature_bank.filled == 0
    engine.close()
    assert processors(components.unet)[0].__class__ is not _BankedProcessor


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize(("steps", "frames"), [(2, 1), (3, 2)])
def test_stream_equals_reference_with_the_bank_on(components, steps: int, frames: int, cfg: str) -> None:  # noqa: ANN001
    """The reference runs each stage against the same bank rows the stream's stage uses.

    Attention only: fusion picks a nearest token (an argmax) and compares with a threshold, so two
    batch shapes' rounding may pick another token at a near-tie; fusion has its own tests."""
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    engine.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.6, **BANK,
                   feature_bank_interval=600)
    plain = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    plain.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.6)
    latents, plain_latents = record_latents(engine), record_latents(plain)

    def batch(f: torch.Tensor) -> torch.Tensor:
        return f if frames > 1 else f[0]

    engine(batch(scene(frames)))  # recorded into the bank (processed call 0), then the bank stays
    frame = batch(with_patch(scene(frames)))  # a real change in one quarter: the bank forgets it there
    for _ in range(steps):
        out = engine(frame)
    stream_latent = latents[-1]
    ref = engine.reference(frame)
    assert engine.feature_bank.filled == 1
    written = torch.cat([valid[:, 0].flatten() for valid in engine.feature_bank.validity()])
    assert 0 < int(written.sum()) < written.numel()  # partly forgotten: the reference sees the same masks
    assert maxdiff(out, ref) <= TOL
    # Float32 rounding of other batch shapes, relative to the latents' size (up to ~70 with RCFG).
    scale = float(stream_latent.abs().max())
    rounding = maxdiff(stream_latent, latents[-1])
    assert rounding <= 2e-6 * scale
    # …and the bank matters: without it the same frame gives another latent, by far more than
    # that rounding (measured 3300–10000× on the trained tiny model).
    plain.reference(frame)
    assert maxdiff(stream_latent, plain_latents[-1]) > 100 * max(rounding, 1e-6)
    engine.close()


def test_the_bank_forgets_where_the_input_moved_and_keeps_the_rest(components) -> None:  # noqa: ANN001
    """Per row (stage), slot and token: a change in one quarter is forgotten there, in every slot,
    by each stage when its frame gets there; the rest of the bank stays, and so does a slot
    written after the change; another scene forgets everything."""
    engine = make_engine(components)  # T = 2, cfg self: row 0 is stage 0, row 1 stage 1
    engine.prepare(prompt="a red fox", **BANK, feature_bank_size=2, feature_bank_interval=2)
    bank = engine.feature_bank
    for _ in range(5):  # written at calls 0, 2, 4: both slots hold the still scene
        engine(scene()[0])
    assert bank.filled == 2 and all(bool(valid.all()) for valid in bank.validity())
    changed = with_patch(scene())[0]

    def masks() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (validity (rows, M, side, side), the changed quarter's part of it)."""
        out = []
        for layer, valid in zip(bank.layers, bank.validity(), strict=True):
            side = SIZE // 8 >> layer.level
            grid = valid.unflatten(-1, (side, side))
            out.append((grid, grid[..., : side // 2, : side // 2]))
        return out

    engine(changed)  # call 5 (not written): the change enters stage 0; stage 1's frame is the old one
    for grid, quarter in masks():
        assert not bool(quarter[0].any()) and int(grid[0].sum()) == grid[0].numel() - quarter[0].numel()
        assert bool(grid[1].all())
    engine(changed)  # call 6: the change reaches stage 1; then slot 1 is written with the new scene
    for grid, quarter in masks():
        old, new = grid[:, 0], grid[:, 1]
        assert not bool(quarter[:, 0].any()) and int(old.sum()) == old.numel() - quarter[:, 0].numel()
        assert bool(new.all())
    dark = torch.zeros_like(changed)
    engine(dark)  # call 7: the lights go out, everywhere: stage 0 forgets every token
    assert not any(bool(valid[0].any()) for valid in bank.validity())
    engine(dark)  # stage 1 a call later; then call 8 writes slot 0 with the dark scene
    assert not any(bool(valid[:, 1].any()) for valid in bank.validity())
    assert all(bool(valid[:, 0].all()) for valid in bank.validity())
    engine.close()


def test_the_input_motion_is_computed_only_while_the_bank_or_motion_aware_smoothing_is_on(components) -> None:  # noqa: ANN001
    engine = make_engine(components)
    engine.prepare(prompt="a red fox")
    observed = []
    observe = engine._motion.observe
    engine._motion.observe = lambda image: (observed.append(len(observed)), observe(image))  # type: ignore[method-assign]
    frame = scene()[0]
    steps = [{}, {"smoothing": 0.5, "smoothing_motion": False}, {"smoothing_motion": True},
             {"smoothing": 0.0, "feature_bank": True}, {"feature_bank": False}]
    counts = []
    for change in steps:
        engine.update(**change)
        engine(frame)
        counts.append(len(observed))
    assert counts == [0, 0, 1, 2, 2]  # both off: nothing; the bank alone needs it too
    engine.close()


def test_a_real_change_with_the_bank_on_is_fully_visible_within_t_plus_2_frames(components) -> None:  # noqa: ANN001
    """The bank at its defaults (4 slots, every 4th frame, fusion 0.8), the schedule and the change
    of benchmarks/temporal.py (a white square of a quarter side): T + 2 frames after the change
    enters, and from then on, the output is within 10 % of the change of where it settles (with
    the old scene's features kept in the bank it was not: 13 % at T + 2, 11 % a frame later)."""
    steps = 2
    engine = make_engine(components, steps=steps, t_index_list=[32, 45])
    engine.prepare(prompt="a red fox", feature_bank=True)
    square = (slice(SIZE // 4, SIZE // 2), slice(SIZE // 4, SIZE // 2))
    before, after, change = scene()[0], with_patch(scene(), square)[0], 16
    outputs = [engine(before if i < change else after).float() for i in range(change + 20)]
    assert engine.feature_bank.filled == 4
    settled = torch.stack(outputs[-3:]).mean(0)
    total = float((settled - outputs[change - 1]).abs().mean())
    assert total > 0.01  # the change shows in the output
    for i in range(change + steps + 2, len(outputs)):
        assert float((outputs[i] - settled).abs().mean()) <= 0.1 * total, i
    engine.close()


@pytest.fixture(scope="module")
def banked_graph(components, tmp_path_factory):  # noqa: ANN001, ANN201
    """The tiny UNet exported with the bank as inputs and outputs: T = 2, cfg self (2 rows), M = 2."""
    pytest.importorskip("onnx")
    from streamnode.accel.onnx_bank import export_banked_unet

    path = tmp_path_factory.mktemp("banked") / "unet_banked.onnx"
    return export_banked_unet(components, path, rows=2, bank_size=2, height=SIZE, width=SIZE)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_stateless_banked_unet_matches_the_eager_bank(components, banked_graph, runtime: str) -> None:  # noqa: ANN001
    pytest.importorskip(runtime)
    from streamnode.accel.onnx_bank import BankedGraphUnet

    settings = {**BANK, "feature_bank_size": 2, "feature_bank_interval": 1}  # attention only: see above
    eager = make_engine(components)
    eager.prepare(prompt="a red fox", **settings)
    assert eager.batch_rows == 2
    stateless = make_engine(components)
    stateless.prepare(prompt="a red fox", **settings)
    stateless.unet_call = BankedGraphUnet(banked_graph, runtime=runtime)
    a, b = record_latents(eager), record_latents(stateless)
    corner = (slice(0, SIZE // 4), slice(SIZE // 2, None))
    for frame in (scene()[0], with_patch(scene())[0], with_patch(scene(), corner)[0], scene()[0]):
        eager(frame)
        stateless(frame)
    assert eager.feature_bank.filled == stateless.feature_bank.filled == 2
    forgotten = [int((~valid).sum()) for valid in stateless.feature_bank.validity()]
    assert all(0 < n < valid.numel() for n, valid in zip(forgotten, stateless.feature_bank.validity(), strict=True))
    for x, y in zip(a, b, strict=True):
        assert maxdiff(x, y) <= TOL
    # The reference's per-stage calls (other row counts than the graph's) run eager on the same bank.
    assert maxdiff(stateless.reference(frame), eager.reference(frame)) <= TOL
    # The banks the engines keep (the graph's outputs written into the ring) agree too.
    for kvo_e, kvo_s in zip(eager.feature_bank.storage(), stateless.feature_bank.storage(), strict=True):
        for x, y in zip(kvo_e, kvo_s, strict=True):
            assert maxdiff(x, y) <= 1e-3 * max(1.0, float(x.abs().max()))
    eager.close()
    stateless.close()


def test_a_backend_that_cannot_take_the_bank_is_bypassed_while_it_is_on(components, caplog) -> None:  # noqa: ANN001
    eager, accelerated = make_engine(components), make_engine(components)
    calls = []
    original = accelerated.unet_call

    def backend(x, t, emb, **kw):  # noqa: ANN001, ANN003, ANN202 - a stand-in accelerated seam
        calls.append(x.shape[0])
        return original(x, t, emb, **kw)

    accelerated.unet_call = backend
    settings = {"feature_bank": True, "feature_fusion": 0.5, "feature_fusion_threshold": 0.0, "feature_bank_interval": 1}
    eager.prepare(prompt="a red fox", **settings)
    accelerated.prepare(prompt="a red fox", **settings)
    with caplog.at_level(logging.WARNING, logger="streamnode"):  # whatever level an earlier test left
        for seed in range(3):
            frame = float_frames(1, seed)[0]
            assert maxdiff(accelerated(frame), eager(frame)) <= TOL
    assert calls == [] and "does not take the bank" in caplog.text
    accelerated.update(feature_bank=False)  # off: the backend serves again
    accelerated(float_frames(1, 5)[0])
    assert calls == [accelerated.batch_rows]
    eager.close()
    accelerated.close()


def test_the_banked_graph_fuses_as_the_eager_bank_does(components, banked_graph) -> None:  # noqa: ANN001
    """The graph's fusion on a bank whose outputs are one vector per layer: every token's nearest is
    that vector whatever the rounding (no argmax near-ties), and threshold −1 fuses every token."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from streamnode.diffusion.feature_bank import BankedUNetStep

    g = torch.Generator().manual_seed(3)
    bank = FeatureBank(components.unet, (SIZE // 8, SIZE // 8))
    bank.configure(size=2, fusion=0.5, threshold=0.0)
    bank.reset(rows=2)
    features = []
    for kvo in bank.storage():
        k, v, o = (torch.randn(t.shape, generator=g) for t in kvo)
        features += [torch.zeros(k.shape[0], k.shape[1] + k.shape[1] // 2), k, v,  # all valid: bias 0
                     torch.randn(1, 1, o.shape[-1], generator=g).expand_as(o).contiguous()]
    seam = (torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g), torch.tensor([600.0, 300.0]),
            torch.randn(2, 77, components.cross_attention_dim, generator=g))

    def inputs(fusion: float) -> tuple[torch.Tensor, ...]:
        return (*seam, torch.tensor(fusion), torch.tensor(-1.0), *features)

    bank.install()
    try:
        with torch.no_grad():
            eager = BankedUNetStep(components.unet, bank)(*inputs(0.5))
            unfused = BankedUNetStep(components.unet, bank)(*inputs(0.0))
    finally:
        bank.remove()
    session = ort.InferenceSession(str(banked_graph), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs(0.5), strict=True)})
    assert len(got) == len(eager) == 1 + 3 * len(bank.layers)  # ε, then (K, V, O) per layer
    for x, y in zip(eager, got, strict=True):
        assert maxdiff(x, torch.from_numpy(y)) <= 1e-4 * max(1.0, float(x.abs().max()))
    assert maxdiff(eager[0], unfused[0]) > 1e-2  # fusion really moved the prediction


def test_bank_storage_is_sized_once_per_layout(components) -> None:  # noqa: ANN001
    bank = FeatureBank(components.unet, (SIZE // 8, SIZE // 8))
    bank.configure(size=3, fusion=0.8, threshold=0.98)
    bank.reset(rows=4)
    shapes = [tuple(kvo[0].shape) for kvo in bank.storage()]
    assert [s[0] for s in shapes] == [4] * len(shapes) and all(s[1] % 3 == 0 for s in shapes)
    before = [kvo[0].data_ptr() for kvo in bank.storage()]
    bank.reset()
    assert [kvo[0].data_ptr() for kvo in bank.storage()] == before  # emptied, not reallocated


# -- smoothing ----------------------------------------------------------------------------


def still_frames_with_noise(count: int, sigma: float, seed: int) -> list[torch.Tensor]:
    base = float_frames(1, seed=5)[0]
    g = torch.Generator().manual_seed(seed)
    return [(base + sigma * torch.randn(base.shape, generator=g)).clamp(0, 1) for _ in range(count)]


@pytest.mark.parametrize("motion", [False, True])
def test_smoothing_blends_each_output_with_the_previous_one(components, motion: bool) -> None:  # noqa: ANN001
    """On a still input with sensor noise, y_t = x0_t + α·(y_{t−1} − x0_t), with or without the gate."""
    plain = make_engine(components)
    plain.prepare(prompt="a red fox")
    smooth = make_engine(components)
    smooth.prepare(prompt="a red fox", smoothing=0.6, smoothing_motion=motion)
    x0, y = record_latents(plain), record_latents(smooth)
    for frame in still_frames_with_noise(6, 4 / 255, seed=1):
        plain(frame)
        smooth(frame)
    assert maxdiff(y[0], x0[0]) == 0.0
    for t in range(1, 6):
        expected = x0[t] + 0.6 * (y[t - 1] - x0[t])
        assert maxdiff(y[t], expected) <= 1e-6 * float(x0[t].abs().max())
        if t >= 2:  # (calls 0 and 1 both output frame 0: it entered at call 0, T − 1 = 1 call late)
            assert maxdiff(y[t], x0[t]) > 10 * 1e-6 * float(x0[t].abs().max())  # the blend is not x0 itself

    def flicker(z: list[torch.Tensor]) -> float:
        return sum(float((b - a).abs().mean()) for a, b in zip(z[:-1], z[1:], strict=True)) / (len(z) - 1)

    assert flicker(y) < 0.75 * flicker(x0)


def test_motion_aware_smoothing_stands_aside_where_the_input_moves(components) -> None:  # noqa: ANN001
    """A block that changes by more than MOTION_HIGH passes unsmoothed when its frame leaves (T − 1
    calls later); a still block stays smoothed."""
    plain = make_engine(components)
    plain.prepare(prompt="a red fox")
    smooth = make_engine(components)
    smooth.prepare(prompt="a red fox", smoothing=0.8, smoothing_motion=True)
    x0, y = record_latents(plain), record_latents(smooth)
    base = float_frames(1, seed=5)[0]
    moved = base.clone()
    top_half = moved[:, : SIZE // 2]
    # The top half changes by 0.3 (0.6 in the VAE's [-1, 1] units, far above MOTION_HIGH) everywhere.
    top_half.copy_(torch.where(top_half < 0.7, top_half + 0.3, top_half - 0.3))
    assert 2 * MOTION_HIGH < 0.6
    frames = [base, base, moved, moved, moved]
    for frame in frames:
        plain(frame)
        smooth(frame)
    # T = 2: the changed frame enters at call 2 and leaves at call 3 (one call later).
    top, bottom = (slice(None), slice(None), slice(0, SIZE // 16)), (slice(None), slice(None), slice(SIZE // 16, None))
    assert maxdiff(y[3][top], x0[3][top]) <= 1e-5  # the moving half shows at once
    expected_bottom = x0[3][bottom] + 0.8 * (y[2][bottom] - x0[3][bottom])
    assert maxdiff(y[3][bottom], expected_bottom) <= 1e-5  # the still half is smoothed as before


def test_the_bank_works_on_sdxl_and_the_stream_still_equals_its_reference(tiny_sdxl_components) -> None:  # noqa: ANN001
    engine = make_engine(tiny_sdxl_components, cfg="full")
    engine.prepare(prompt="a red fox", guidance_scale=1.5, **BANK, feature_bank_interval=600)
    latents = record_latents(engine)
    engine(float_frames(1, 100)[0])
    frame = float_frames(1, 7)[0]
    for _ in range(2):
        engine(frame)
    stream_latent = latents[-1]
    engine.reference(frame)
    assert engine.feature_bank.filled == 1
    assert maxdiff(stream_latent, latents[-1]) <= 2e-6 * float(stream_latent.abs().max())
    engine.close()
    assert not any(isinstance(p, _BankedProcessor) for p in processors(tiny_sdxl_components.unet))
