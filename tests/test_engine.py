"""StreamEngine on the tiny model, CPU, fp32, 64×64: stream batch = sequential reference = hand math.

Latents are compared before the VAE decoder (captured through the `vae_decode` seam) as well
as the images: the tiny random decoder clamps much of its output, which would hide errors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streamnode.diffusion.stream import UPDATE_KEYS, StreamEngine

SIZE = 64
TOL = 1e-4
T_INDEX = {1: [32], 2: [20, 45], 3: [10, 30, 45], 4: [5, 20, 32, 45]}


def make_engine(components, *, steps=2, frames=1, cfg="self", **kw) -> StreamEngine:  # noqa: ANN001
    kw.setdefault("similarity_threshold", 0.0)
    kw.setdefault("seed", 2)
    return StreamEngine.from_components(
        components,
        t_index_list=kw.pop("t_index_list", T_INDEX[steps]),
        width=SIZE,
        height=SIZE,
        frame_buffer_size=frames,
        cfg_type=cfg,
        **kw,
    )


def float_frames(frames: int, seed: int) -> torch.Tensor:
    """A smooth float frame batch (F, 3, H, W) in [0, 1]: random images are unlike any video."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((frames, 3, 8, 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def record_latents(engine: StreamEngine) -> list[torch.Tensor]:
    """Record every latent batch handed to the decoder (the x0 that leaves)."""
    seen: list[torch.Tensor] = []
    decode = engine.vae_decode

    def recording(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        return decode(z)

    engine.vae_decode = recording
    return seen


def maxdiff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# -- the stream batch equals the sequential reference -------------------------------------


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_stream_batch_equals_reference_after_warmup(components, steps: int, frames: int, cfg: str) -> None:
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg)
    engine.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.6, delta=0.7)
    latents = record_latents(engine)
    # Other frames first, so the buffer holds unrelated content that must be flushed.
    for seed in range(3):
        engine(float_frames(frames, seed=100 + seed) if frames > 1 else float_frames(1, 100 + seed)[0])
    frame = float_frames(frames, seed=7)
    frame = frame if frames > 1 else frame[0]
    outputs = [engine(frame) for _ in range(steps)]
    stream_latent = latents[-1]
    ref = engine.reference(frame)
    ref_latent = latents[-1]
    # After T − 1 calls with this frame the frame leaving the stream is this one, fully.
    assert maxdiff(outputs[-1], ref) <= TOL
    assert maxdiff(stream_latent, ref_latent) <= TOL
    assert outputs[-1].shape == frame.shape
    # The UNet saw batch_rows rows per stream call (DESIGN.md's row counts).
    B = steps * frames
    assert engine.batch_rows == {"none": B, "full": 2 * B, "self": B, "initialize": B + frames}[cfg]


@pytest.mark.parametrize("cfg", ["none", "self", "initialize", "full"])
def test_first_output_after_prepare_is_already_the_full_pipeline(components, cfg: str) -> None:
    """No zero-latent (brown) warm-up frames: the first frame fills the buffer by itself."""
    engine = make_engine(components, steps=3, frames=2, cfg=cfg)
    engine.prepare(prompt="lanterns", guidance_scale=1.4)
    frame = float_frames(2, seed=3)
    first = engine(frame)
    assert engine.stats["unet_calls"] == 3  # T − 1 silent steps + the real one, same batch shape
    assert engine.stats["warm_fills"] == 1
    assert maxdiff(first, engine.reference(frame)) <= TOL


@pytest.mark.parametrize("cfg", ["none", "self", "initialize", "full"])
@pytest.mark.parametrize(("steps", "frames"), [(1, 1), (2, 2), (4, 1)])
def test_txt2img_equals_reference_and_is_valid_from_the_first_call(components, steps, frames, cfg) -> None:
    engine = make_engine(components, steps=steps, frames=frames, cfg=cfg, t_index_list=[0, 16, 32, 45][:steps])
    engine.prepare(prompt="a castle", negative_prompt="fog", guidance_scale=1.3)
    first = engine.txt2img(output_type="pt")
    again = engine.txt2img(output_type="pt")
    ref = engine.reference(None, output_type="pt")
    assert first.shape == ((frames, 3, SIZE, SIZE) if frames > 1 else (3, SIZE, SIZE))
    assert maxdiff(first, ref) <= TOL and maxdiff(again, ref) <= TOL
    image = engine.txt2img()
    assert image.dtype == np.uint8 and image.shape == ((frames, SIZE, SIZE, 3) if frames > 1 else (SIZE, SIZE, 3))


# -- hand computations from diffusers' own components ---------------------------------------


def hand_pipeline(c, frame01, t_index, cfg, *, prompt, negative, g, delta, seed, prediction="epsilon"):  # noqa: ANN001, ANN201
    """The stream's per-frame math written out from DESIGN.md / the research notes, on raw parts.

    Returns (decoded image in [0, 1], [x0 of every stage], [ε̂ of every stage]).
    """
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(50)
    taus = [int(scheduler.timesteps[i]) for i in t_index]
    acp = scheduler.alphas_cumprod.double()
    a = [float(acp[t].sqrt()) for t in taus]
    b = [float((1 - acp[t]).sqrt()) for t in taus]
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in taus]
    c_skip, c_out = [float(s) for s, _ in scalings], [float(o) for _, o in scalings]
    h = SIZE // 8
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = [torch.randn((4, h, h), generator=generator)[None] for _ in taus]
    with torch.inference_mode():
        e_c = c.encode_text([prompt])
        e_u = c.encode_text([negative])
        if frame01 is None:
            x = noise[0]
        else:
            z = c.vae.encode(frame01[None] * 2 - 1).latents * c.vae_scaling_factor
            x = a[0] * z + b[0] * noise[0]
        s = noise[0]

        def eps_of(x, t, e):  # noqa: ANN001, ANN202
            out = c.unet(x, torch.tensor([t]), encoder_hidden_states=e).sample
            if prediction == "v_prediction":
                k = taus.index(t)
                return a[k] * out + b[k] * x
            return out

        x0s, eps_hats = [], []
        for k, t in enumerate(taus):
            eps_c = eps_of(x, t, e_c)
            if cfg == "full":
                eps_u = eps_of(x, t, e_u)
            elif cfg in ("self", "initialize"):
                if cfg == "initialize" and k == 0:
                    s = eps_of(x, t, e_u)
                eps_u = delta * s
            eps_hat = eps_u + g * (eps_c - eps_u) if cfg != "none" and g > 1 else eps_c
            x0 = c_out[k] * (x - b[k] * eps_hat) / a[k] + c_skip[k] * x
            x0s.append(x0)
            eps_hats.append(eps_hat)
            if k + 1 < len(taus):
                residual = c_out[k] * b[k] * (s - eps_hat) / a[k] + c_skip[k] * b[k] * s
                s = noise[k + 1] + (a[k + 1] / b[k + 1]) * residual
                x = a[k + 1] * x0 + b[k + 1] * noise[k + 1]
        image = ((c.vae.decode(x0 / c.vae_scaling_factor).sample + 1) / 2).clamp(0, 1)[0]
    return image, x0s, eps_hats


def test_t1_cfg_none_equals_diffusers_components_by_hand(components) -> None:
    from diffusers import LCMScheduler

    c = components
    frame = float_frames(1, seed=11)[0]
    engine = make_engine(c, steps=1, cfg="none", t_index_list=[32], seed=5)
    engine.prepare(prompt="a lighthouse")
    latents = record_latents(engine)
    out = engine(frame)

    # By hand: VAE encode, LCMScheduler ᾱ and boundary scalings, UNet, VAE decode, same noise.
    image, x0s, _ = hand_pipeline(c, frame, [32], "none", prompt="a lighthouse", negative="", g=1.0, delta=1.0, seed=5)
    assert maxdiff(latents[-1], x0s[0]) <= TOL
    assert maxdiff(out, image) <= TOL

    # And the scheduler's own step() on the same noisy latent gives the same x0.
    scheduler = LCMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(50)
    tau = int(scheduler.timesteps[32])
    generator = torch.Generator("cpu").manual_seed(5)
    n0 = torch.randn((4, SIZE // 8, SIZE // 8), generator=generator)[None]
    with torch.inference_mode():
        z = c.vae.encode(frame[None] * 2 - 1).latents * c.vae_scaling_factor
        x = scheduler.add_noise(z, n0, torch.tensor([tau]))
        eps = c.unet(x, tau, encoder_hidden_states=c.encode_text(["a lighthouse"])).sample
        single = LCMScheduler.from_config(c.scheduler.config)
        single.set_timesteps(timesteps=[tau])
        denoised = single.step(eps, tau, x).denoised
    assert maxdiff(latents[-1], denoised) <= TOL


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_rcfg_recurrence_matches_the_written_out_math(components, cfg: str) -> None:
    frame = float_frames(1, seed=12)[0]
    engine = make_engine(components, steps=2, cfg=cfg, seed=9)
    engine.prepare(prompt="neon koi", negative_prompt="grey", guidance_scale=2.0, delta=0.6)
    latents = record_latents(engine)
    for _ in range(3):
        out = engine(frame)
    image, x0s, _ = hand_pipeline(
        components, frame, T_INDEX[2], cfg, prompt="neon koi", negative="grey", g=2.0, delta=0.6, seed=9
    )
    assert maxdiff(latents[-1], x0s[-1]) <= TOL
    assert maxdiff(out, image) <= TOL


def test_txt2img_matches_the_written_out_math(components) -> None:
    engine = make_engine(components, steps=2, cfg="self", t_index_list=[0, 32], seed=4)
    engine.prepare(prompt="a desert", guidance_scale=1.5, delta=1.0)
    out = engine.txt2img(output_type="pt")
    image, _, _ = hand_pipeline(components, None, [0, 32], "self", prompt="a desert", negative="", g=1.5,
                                delta=1.0, seed=4)
    assert maxdiff(out, image) <= TOL


def test_v_prediction_models_are_stepped_in_epsilon(components) -> None:
    from diffusers import LCMScheduler

    v_components = dataclasses.replace(
        components, scheduler=LCMScheduler.from_config(components.scheduler.config, prediction_type="v_prediction")
    )
    frame = float_frames(1, seed=13)[0]
    engine = make_engine(v_components, steps=1, cfg="none", t_index_list=[30], seed=3)
    engine.prepare(prompt="snow")
    latents = record_latents(engine)
    engine(frame)
    _, x0s, _ = hand_pipeline(v_components, frame, [30], "none", prompt="snow", negative="", g=1.0, delta=1.0,
                              seed=3, prediction="v_prediction")
    assert maxdiff(latents[-1], x0s[0]) <= TOL


# -- work per frame ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_one_unet_call_per_processed_frame(components, cfg: str) -> None:
    engine = make_engine(components, steps=4, frames=2, cfg=cfg)
    engine.prepare(prompt="x")
    rows: list[int] = []
    unet_call = engine.unet_call

    def counting(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[0])
        assert t.shape == (x.shape[0],) and emb.shape[0] == x.shape[0]
        return unet_call(x, t, emb)

    engine.unet_call = counting
    engine(float_frames(2, 0))  # warm fill: T calls for this first frame only
    before = dict(engine.stats)
    rows.clear()
    n = 5
    for i in range(n):
        engine(float_frames(2, i + 1))
    delta = {k: engine.stats[k] - before[k] for k in before}
    assert rows == [engine.batch_rows] * n
    assert delta == {"unet_calls": n, "vae_encodes": n, "vae_decodes": n, "text_encodes": 0,
                     "frames": 2 * n, "skipped": 0, "warm_fills": 0}


def test_every_unet_and_vae_evaluation_goes_through_the_swappable_attributes(components, monkeypatch) -> None:
    engine = make_engine(components, steps=2, frames=2, cfg="initialize")
    engine.prepare(prompt="y", guidance_scale=1.5)

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the engine called the model directly")

    monkeypatch.setattr(components.unet, "forward", broken)
    monkeypatch.setattr(components.vae, "forward", broken)
    monkeypatch.setattr(components.vae, "encode", broken)
    monkeypatch.setattr(components.vae, "decode", broken)
    h = SIZE // 8
    calls = {"unet": 0, "encode": 0, "decode": 0}

    def unet_call(x, t, emb):  # noqa: ANN001, ANN202
        calls["unet"] += 1
        return torch.zeros_like(x)

    def vae_encode(img):  # noqa: ANN001, ANN202
        calls["encode"] += 1
        return torch.zeros((img.shape[0], 4, h, h))

    def vae_decode(z):  # noqa: ANN001, ANN202
        calls["decode"] += 1
        return torch.zeros((z.shape[0], 3, SIZE, SIZE))

    engine.unet_call, engine.vae_encode, engine.vae_decode = unet_call, vae_encode, vae_decode
    frame = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    assert engine(frame).shape == frame.shape
    engine.txt2img()
    engine.reference(frame)
    engine.reference(None)
    assert calls["unet"] == 2 + 1 + 2 + 2 and calls["encode"] == 2 and calls["decode"] == 4


# -- live updates --------------------------------------------------------------------------


def test_prompt_update_changes_output_and_transition_reaches_the_target(components) -> None:
    engine = make_engine(components, steps=2, cfg="self", prompt_transition_frames=3)
    engine.prepare(prompt="a forest")
    frame = float_frames(1, seed=21)[0]
    latents = record_latents(engine)
    for _ in range(3):
        engine(frame)
    before = latents[-1]
    engine.update(prompt="a city at night")
    for _ in range(3 + 2):  # transition frames, then T more frames
        engine(frame)
    after = latents[-1]
    assert maxdiff(before, after) > 1e-2
    # Settled: exactly the new prompt's pipeline.
    engine.reference(frame)
    assert maxdiff(after, latents[-1]) <= TOL
    fresh = make_engine(components, steps=2, cfg="self")
    fresh.prepare(prompt="a city at night")
    fresh_latents = record_latents(fresh)
    fresh(frame)
    assert maxdiff(after, fresh_latents[-1]) <= TOL


def test_prompt_transition_blends_linearly_over_the_given_frames(components) -> None:
    engine = make_engine(components, steps=1, cfg="none", prompt_transition_frames=4)
    engine.prepare(prompt="a")
    frame = float_frames(1, seed=22)[0]
    engine(frame)
    embs: list[torch.Tensor] = []
    unet_call = engine.unet_call

    def recording(x, t, emb):  # noqa: ANN001, ANN202
        embs.append(emb.clone())
        return unet_call(x, t, emb)

    engine.unet_call = recording
    start = components.encode_text(["a"])
    target = components.encode_text(["b"])
    engine.update(prompt="b")
    for _ in range(5):
        engine(frame)
    for i, emb in enumerate(embs[:4]):
        assert maxdiff(emb[0], torch.lerp(start, target, (i + 1) / 4)[0]) <= 1e-5
    assert maxdiff(embs[4][0], target[0]) <= 1e-6


def test_flipping_between_prompts_costs_no_text_encoding(components) -> None:
    engine = make_engine(components, steps=1, cfg="none", prompt_transition_frames=0)
    engine.prepare(prompt="one")
    engine.update(prompt="two")
    engine.update(prompt_blend=[("one", 0.5), ("two", 1.0)])
    encodes = engine.stats["text_encodes"]
    for _ in range(3):
        for prompt in ("one", "two"):
            engine.update(prompt=prompt)
            engine(float_frames(1, 0)[0])
    engine.update(prompt_blend=[("one", 0.5), ("two", 1.0)], blend_method="slerp")
    assert engine.stats["text_encodes"] == encodes


def test_same_seed_same_frames_and_seed_changes_the_output(components) -> None:
    frames = [float_frames(1, seed=s)[0] for s in range(4)]
    runs = []
    for seed in (3, 3, 4):
        engine = make_engine(components, steps=2, cfg="self", seed=seed)
        engine.prepare(prompt="clouds")
        runs.append([engine(f) for f in frames])
    assert all(maxdiff(a, b) == 0.0 for a, b in zip(runs[0], runs[1], strict=True))
    assert max(maxdiff(a, b) for a, b in zip(runs[0], runs[2], strict=True)) > 1e-4


def test_seed_change_renoises_every_stage_with_the_new_noise(components) -> None:
    """The next frame after a seed change is one LCM step from a latent at exactly its level."""
    frame = float_frames(1, seed=30)[0]
    engine = make_engine(components, steps=2, cfg="none", seed=1)
    engine.prepare(prompt="waves")
    latents = record_latents(engine)
    for _ in range(2):
        engine(frame)
    engine.update(seed=8)
    engine(frame)
    # By hand: stage 1 = a_1·x0_0(old seed, this frame) + b_1·n_1(new seed), one UNet step.
    _, old_x0s, _ = hand_pipeline(components, frame, T_INDEX[2], "none", prompt="waves", negative="", g=1.0,
                                  delta=1.0, seed=1)
    schedule = engine.schedule
    a1, b1 = float(schedule.alpha[1]), float(schedule.beta[1])
    n1 = engine.stage_noise[1:2]
    x1 = a1 * old_x0s[0] + b1 * n1
    with torch.inference_mode():
        eps = components.unet(x1, schedule.timesteps[1:2], encoder_hidden_states=components.encode_text(["waves"])).sample
    x0 = float(schedule.c_out[1]) * (x1 - b1 * eps) / a1 + float(schedule.c_skip[1]) * x1
    assert maxdiff(latents[-1], x0) <= TOL
    # And T − 1 frames later the stream is the new seed's pipeline exactly.
    engine(frame)
    engine.reference(frame)
    assert maxdiff(latents[-2], latents[-1]) <= TOL


@pytest.mark.parametrize("new_steps", [1, 2, 3, 4])
def test_t_index_change_gives_valid_frames_and_converges(components, new_steps: int) -> None:
    engine = make_engine(components, steps=2, frames=2, cfg="self")
    engine.prepare(prompt="rain")
    latents = record_latents(engine)
    frames2 = float_frames(2, seed=31)
    for _ in range(2):
        engine(frames2)
    engine.update(t_index_list=T_INDEX[new_steps])
    assert engine.batch_rows == new_steps * 2 and engine.t_index_list == T_INDEX[new_steps]
    outputs = [engine(frames2) for _ in range(new_steps)]
    assert all(torch.isfinite(latents[-k]).all() for k in range(1, new_steps + 1))
    engine.reference(frames2)
    assert maxdiff(latents[-2], latents[-1]) <= TOL
    assert outputs[-1].shape == frames2.shape


def test_strength_maps_to_t_index_and_keeps_steps(components) -> None:
    engine = make_engine(components, steps=2)
    engine.update(strength=0.36)
    assert engine.t_index_list == [32, 41] and engine.params.strength == 0.36
    engine.update(t_index_list=[5, 20, 45])
    engine.update(strength=1.0)
    assert engine.t_index_list == [0, 16, 33]
    built = make_engine(components, steps=4, strength=0.5)
    assert len(built.t_index_list) == 4 and built.t_index_list[0] == 25


def test_blends(components) -> None:
    engine = make_engine(components, steps=1, cfg="none", prompt_transition_frames=0)
    frame = float_frames(1, 40)[0]
    engine.prepare(prompt="a cat")
    base = engine(frame)
    for method in ("linear", "slerp"):
        engine.update(prompt_blend=[("a cat", 1.0), ("a dog", 0.0)], blend_method=method)
        assert maxdiff(engine(frame), base) <= TOL
    engine.update(prompt_blend=[("a cat", 0.5), ("a dog", 0.5)], blend_method="linear")
    mixed = engine(frame)
    assert engine.params.prompt is None and maxdiff(mixed, base) > 0
    # Seed blends: a single seed at any weight is that seed; a mix is a unit-variance noise.
    engine.update(seed=7)
    n7 = engine.stage_noise
    engine.update(seed_blend=[(7, 0.3), (9, 0.0)])
    assert maxdiff(engine.stage_noise, n7) <= 1e-6 and engine.params.seed is None
    engine.update(seed_blend=[(7, 1.0), (9, 1.0)])
    assert 0.8 < float(engine.stage_noise.std()) < 1.2


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": 25.0}, "guidance_scale"),
        ({"delta": -1.0}, "delta"),
        ({"t_index_list": [50]}, "0..49"),
        ({"t_index_list": [45, 20]}, "increasing"),
        ({"t_index_list": []}, "t_index_list"),
        ({"strength": 1.5}, "strength"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"prompt_blend": [("a", -1.0)]}, "weight"),
        ({"prompt_blend": [("a", 0.0)]}, "must not all be 0"),
        ({"prompt_blend": "a cat"}, "pairs"),
        ({"seed_blend": [(1.5, 1.0)]}, "integer"),
        ({"blend_method": "cubic"}, "linear, slerp"),
        ({"similarity_threshold": 2.0}, "similarity_threshold"),
        ({"similarity_max_skip": -1}, "similarity_max_skip"),
        ({"prompt_transition_frames": -1}, "prompt_transition_frames"),
        ({"frobnicate": 1}, "unknown"),
        ({"prompt": "a", "prompt_blend": [("b", 1.0)]}, "not both"),
        ({"t_index_list": [1], "strength": 0.5}, "not both"),
        ({"guidance_scale": 2.0, "t_index_list": [99]}, "0..49"),  # nothing applied, not even guidance
    ],
)
def test_bad_updates_are_rejected_and_leave_the_engine_as_it_was(components, kwargs, words) -> None:
    engine = make_engine(components, steps=2, cfg="self")
    engine.prepare(prompt="calm")
    frame = float_frames(1, 50)[0]
    engine(frame)
    params = engine.params
    with pytest.raises(ValueError, match=words):
        engine.update(**kwargs)
    assert engine.params == params
    twin = make_engine(components, steps=2, cfg="self")
    twin.prepare(prompt="calm")
    twin(frame)
    assert maxdiff(engine(frame), twin(frame)) == 0.0


def test_empty_prompt_is_valid(components) -> None:
    engine = make_engine(components, steps=1)
    engine.prepare(prompt="", negative_prompt="")
    engine.update(prompt="")
    assert engine(np.zeros((SIZE, SIZE, 3), np.uint8)).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (np.zeros((SIZE, SIZE, 4), np.uint8), "4 channels"),
        (np.zeros((SIZE, SIZE), np.uint8), "expected"),
        (np.zeros((32, SIZE, 3), np.uint8), "resize"),
        (np.zeros((SIZE, SIZE, 3), np.float32), "uint8"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), "frame_buffer_size is 1"),
        (torch.full((3, SIZE, SIZE), 2.0), r"\[0, 1\]"),
        (torch.full((3, SIZE, SIZE), float("nan")), r"\[0, 1\]"),
        (torch.zeros((3, SIZE, SIZE), dtype=torch.int32), "dtype"),
        ([[0, 0, 0]], "numpy array or a torch tensor"),
    ],
)
def test_bad_frames_raise_a_clear_error_and_change_nothing(components, frame, words) -> None:
    engine = make_engine(components, steps=2)
    good = float_frames(1, 60)[0]
    first = engine(good)
    stats = dict(engine.stats)
    with pytest.raises(ValueError, match=words):
        engine(frame)
    assert engine.stats == stats
    assert maxdiff(engine(good), first) <= TOL  # still streaming the same frame, unharmed


def test_stacked_frames_are_required_when_f_is_above_one(components) -> None:
    engine = make_engine(components, steps=2, frames=2)
    with pytest.raises(ValueError, match=r"frame_buffer_size is 2"):
        engine(np.zeros((SIZE, SIZE, 3), np.uint8))


def test_output_kinds_follow_the_input(components) -> None:
    engine = make_engine(components, steps=2)
    frame = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    out = engine(frame)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == frame.shape
    out[...] = 0  # a fresh array: editing it must not reach the engine
    again = engine(frame)
    assert again is not out and again.any()
    tensor_out = engine(torch.from_numpy(frame))
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.dtype == torch.uint8
    assert tensor_out.shape == frame.shape
    tensor_out.add_(1)  # an ordinary tensor, not an inference tensor
    batched = engine(frame[None])
    assert batched.shape == (1, SIZE, SIZE, 3)
    # uint8 and float inputs describe the same picture: outputs agree to a level.
    as_float = torch.from_numpy(frame).permute(2, 0, 1).float() / 255
    f_out = engine(as_float)
    assert f_out.shape == (3, SIZE, SIZE) and f_out.dtype == torch.float32
    assert maxdiff(engine(frame), (f_out.permute(1, 2, 0) * 255)) <= 1.0


def test_update_accepts_every_key_the_node_forwards() -> None:
    from streamnode.control.updates import ENGINE_KEYS

    assert set(ENGINE_KEYS) <= UPDATE_KEYS and "blend_method" in UPDATE_KEYS


def test_unsupported_models_are_refused_clearly(components) -> None:
    class Config(dict):
        __getattr__ = dict.get

    class FakeUnet:
        config = Config(in_channels=4, time_cond_proj_dim=256)

    lcm_full = dataclasses.replace(components, unet=FakeUnet())
    with pytest.raises(ValueError, match="lcm_lora"):
        StreamEngine.from_components(lcm_full, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="multiple of 8"):
        StreamEngine.from_components(components, width=100, height=SIZE)
    with pytest.raises(ValueError, match="cfg_type"):
        StreamEngine.from_components(components, width=SIZE, height=SIZE, cfg_type="double")


@pytest.mark.parametrize("fail_at_call", [1, 3])  # 1: during the warm start, 3: a normal frame
def test_a_failing_backend_call_leaves_the_engine_usable(components, fail_at_call: int) -> None:
    engine = make_engine(components, steps=2, cfg="self")
    engine.prepare(prompt="dusk")
    twin = make_engine(components, steps=2, cfg="self")
    twin.prepare(prompt="dusk")
    frame = float_frames(1, 70)[0]
    unet_call, calls = engine.unet_call, [0]

    def flaky(x, t, emb):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == fail_at_call:
            raise RuntimeError("CUDA out of memory (simulated)")
        return unet_call(x, t, emb)

    engine.unet_call = flaky
    outputs = []
    while len(outputs) < 3:
        try:
            outputs.append(engine(frame))
        except RuntimeError:
            continue
    expected = [twin(frame) for _ in range(3)]
    assert all(maxdiff(a, b) <= TOL for a, b in zip(outputs, expected, strict=True))


def test_cross_attention_width_comes_from_the_model(components) -> None:
    """An SD2/sd-turbo-class text encoder (another width than SD1.5's) just works."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    width = 96
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
    ).eval()
    te_config = components.text_encoder.config.to_dict()
    te_config.update(hidden_size=width, num_attention_heads=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_config)).eval()
    sd2 = dataclasses.replace(components, unet=unet, text_encoder=text_encoder)
    assert sd2.cross_attention_dim == width
    engine = make_engine(sd2, steps=2, frames=2, cfg="initialize")
    engine.prepare(prompt="a mountain", negative_prompt="haze", guidance_scale=1.5)
    frame = float_frames(2, 80)
    out = engine(frame)
    assert maxdiff(out, engine.reference(frame)) <= TOL
    mismatched = dataclasses.replace(components, text_encoder=text_encoder)  # 96-wide text, 64-wide UNet
    with pytest.raises(ValueError, match="does not belong"):
        make_engine(mismatched, steps=1)
