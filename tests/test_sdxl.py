"""The SDXL family on the tiny SDXL-architecture model (`tiny-sdxl`), CPU, fp32, 64×64.

The oracle is diffusers' own `StableDiffusionXLPipeline` on the same components: its
`encode_prompt` (both encoders, penultimate states, pooled projection, zeros for no negative
prompt) and `_get_add_time_ids`, fed to the UNet by hand. The engine must equal it, its stream
batch must equal its sequential reference, and prompt blends and brushes must carry the pooled
embedding with the hidden states.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamnode.diffusion.models import ModelLoadError, inspect_folder, load_components, single_file_family
from streamnode.diffusion.stream import StreamEngine

SIZE = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def c(tiny_sdxl_components):  # noqa: ANN001, ANN201
    return tiny_sdxl_components


@pytest.fixture(scope="module")
def pipe(c):  # noqa: ANN001, ANN201
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler, force_zeros_for_empty_prompt=True,
    )


def diffusers_cond(pipe, prompt: str, negative: str | None):  # noqa: ANN001, ANN201
    """(positive hidden, negative hidden, positive pooled, negative pooled, time ids) from diffusers."""
    with torch.inference_mode():
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
        )
        ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                     text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim))
    return pe, ne, pp, npp, ids


def make_engine(c, *, steps=2, frames=1, cfg="self", **kw) -> StreamEngine:  # noqa: ANN001
    kw.setdefault("similarity_threshold", 0.0)
    t_index = kw.pop("t_index_list", {1: [32], 2: [20, 45]}[steps])
    return StreamEngine.from_components(c, t_index_list=t_index, width=SIZE, height=SIZE, frame_buffer_size=frames,
                                        cfg_type=cfg, **kw)


def float_frames(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((frames, 3, 8, 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def maxdiff(a, b) -> float:  # noqa: ANN001
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def record_unet(engine: StreamEngine) -> list[dict]:
    """Every UNet call's encoder_hidden_states and added_cond, as the seam received them."""
    seen: list[dict] = []
    inner = engine.unet_call

    def recording(x, t, emb, *, added_cond=None):  # noqa: ANN001, ANN202
        seen.append({"emb": emb.clone(), **{k: v.clone() for k, v in (added_cond or {}).items()}})
        return inner(x, t, emb, added_cond=added_cond)

    engine.unet_call = recording
    return seen


# -- the model folder ------------------------------------------------------------------------


def test_tiny_sdxl_is_an_sdxl_diffusers_folder(c) -> None:  # noqa: ANN001
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from streamnode.diffusion.tiny_sdxl import tiny_sdxl_dir

    layout = inspect_folder(tiny_sdxl_dir())
    assert layout.family == "sdxl" and layout.pipeline == "StableDiffusionXLPipeline" and layout.zero_empty_negative
    assert not [p for p in tiny_sdxl_dir().rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert isinstance(c.unet, UNet2DConditionModel) and c.unet.config.addition_embed_type == "text_time"
    assert type(c.text_encoder) is CLIPTextModel and type(c.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(c.vae, AutoencoderTiny) and c.tiny_vae
    assert c.family == "sdxl" and c.cross_attention_dim == 64 and c.conditioning.tokens == 78


def test_conditioning_is_what_diffusers_sdxl_pipeline_computes(c, pipe) -> None:  # noqa: ANN001
    """Both encoders' penultimate states side by side, the pooled projection, the size ids; zeros
    for no negative prompt (force_zeros_for_empty_prompt)."""
    pe, ne, pp, npp, ids = diffusers_cond(pipe, "a red fox in the snow " * 10, None)
    packed = c.encode_text(["a red fox in the snow " * 10])
    hidden, added = c.conditioning.unet_inputs(packed, height=SIZE, width=SIZE)
    assert maxdiff(hidden, pe) == 0.0
    assert maxdiff(added["text_embeds"], pp) == 0.0
    assert maxdiff(added["time_ids"], ids) == 0.0
    assert float(ne.abs().max()) == 0.0 and float(npp.abs().max()) == 0.0
    assert c.conditioning.negative_is_zero("") and not c.conditioning.negative_is_zero("blurry")
    # A non-square frame: (h, w) in that order, as diffusers writes them.
    _, wide = c.conditioning.unet_inputs(packed, height=64, width=96)
    assert wide["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]


# -- the engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("frames", [1, 2])
def test_sdxl_stream_batch_equals_reference(c, cfg: str, frames: int) -> None:  # noqa: ANN001
    engine = make_engine(c, steps=2, frames=frames, cfg=cfg)
    engine.prepare(prompt="a red fox", negative_prompt="blurry", guidance_scale=1.6, delta=0.7)
    for seed in range(2):
        engine(float_frames(frames, 100 + seed) if frames > 1 else float_frames(1, 100 + seed)[0])
    frame = float_frames(frames, 7) if frames > 1 else float_frames(1, 7)[0]
    out = [engine(frame) for _ in range(2)][-1]
    assert maxdiff(out, engine.reference(frame)) <= TOL


@pytest.mark.parametrize("negative", [None, "grey fog"])
def test_sdxl_engine_equals_diffusers_conditioning_by_hand(c, pipe, negative: str | None) -> None:  # noqa: ANN001
    """T = 2, full CFG, g = 1.5: each stage's two UNet evaluations by hand with diffusers' own
    conditioning; no negative prompt is zeros, as diffusers' SDXL pipelines use."""
    from diffusers import LCMScheduler

    frame = float_frames(1, 11)[0]
    engine = make_engine(c, steps=2, cfg="full", seed=5)
    engine.prepare(prompt="a lighthouse", negative_prompt=negative or "", guidance_scale=1.5)
    for _ in range(2):
        out = engine(frame)

    pe, ne, pp, npp, ids = diffusers_cond(pipe, "a lighthouse", negative)
    scheduler = LCMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(50)
    taus = [int(scheduler.timesteps[i]) for i in (20, 45)]
    generator = torch.Generator("cpu").manual_seed(5)
    noise = [torch.randn((4, SIZE // 8, SIZE // 8), generator=generator)[None] for _ in taus]
    with torch.inference_mode():
        x0 = c.vae.encode(frame[None] * 2 - 1).latents  # stage 0 starts from the frame's latent
        for k, tau in enumerate(taus):
            acp = scheduler.alphas_cumprod[tau].double()
            a, b = float(acp.sqrt()), float((1 - acp).sqrt())
            x = a * x0 + b * noise[k]  # the frame's latent, then the previous stage's x0, re-noised
            eps = [c.unet(x, torch.tensor([tau]), encoder_hidden_states=e,
                          added_cond_kwargs={"text_embeds": p, "time_ids": ids}).sample for e, p in ((ne, npp), (pe, pp))]
            eps_hat = eps[0] + 1.5 * (eps[1] - eps[0])
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(tau)
            x0 = float(c_out) * (x - b * eps_hat) / a + float(c_skip) * x
        image = ((c.vae.decode(x0).sample + 1) / 2).clamp(0, 1)[0]
    assert maxdiff(out, image) <= TOL


def test_prompt_blend_mixes_both_encoders_and_the_pooled_embedding(c, pipe) -> None:  # noqa: ANN001
    engine = make_engine(c, steps=1, cfg="none", prompt_transition_frames=0)
    engine.prepare(prompt_blend=[("a cat", 0.25), ("a dog", 0.75)])
    calls = record_unet(engine)
    engine(float_frames(1, 3)[0])
    cat, dog = diffusers_cond(pipe, "a cat", None), diffusers_cond(pipe, "a dog", None)
    assert maxdiff(calls[-1]["emb"][0], 0.25 * cat[0][0] + 0.75 * dog[0][0]) <= 1e-5
    assert maxdiff(calls[-1]["text_embeds"][0], 0.25 * cat[2][0] + 0.75 * dog[2][0]) <= 1e-5


def test_prompt_transition_moves_the_pooled_embedding_too(c, pipe) -> None:  # noqa: ANN001
    engine = make_engine(c, steps=1, cfg="none", prompt_transition_frames=4)
    engine.prepare(prompt="a cat")
    calls = record_unet(engine)
    engine(float_frames(1, 3)[0])
    engine.update(prompt="a dog")
    engine(float_frames(1, 3)[0])
    cat, dog = diffusers_cond(pipe, "a cat", None)[2][0], diffusers_cond(pipe, "a dog", None)[2][0]
    assert maxdiff(calls[-1]["text_embeds"][0], torch.lerp(cat, dog, 0.25)) <= 1e-5


def test_brushes_on_sdxl(c, pipe) -> None:  # noqa: ANN001
    """A brush's layer carries its own pooled embedding (mixed toward the global one by its prompt
    strength), and the stream still equals the reference."""
    engine = make_engine(c, steps=2, cfg="self")
    engine.prepare(prompt="a city at night")
    engine.set_brush(0, prompt="roaring flames", rect=(0.0, 0.0, 0.5, 0.5), prompt_strength=0.8)
    calls = record_unet(engine)
    frame = float_frames(1, 5)[0]
    for _ in range(3):
        out = engine(frame)
    assert engine.layers == 2
    city, flames = diffusers_cond(pipe, "a city at night", None)[2][0], diffusers_cond(pipe, "roaring flames", None)[2][0]
    rows = calls[-1]["text_embeds"]  # stage-major, then frame, then layer
    assert maxdiff(rows[0], city) <= 1e-5 and maxdiff(rows[1], torch.lerp(city, flames, 0.8)) <= 1e-5
    assert maxdiff(out, engine.reference(frame)) <= TOL


def test_sdxl_through_the_node_builder(c) -> None:  # noqa: ANN001
    """`streamnode run --model tiny-sdxl`'s own builder: accelerate (eager on a CPU), prepare, stream."""
    from streamnode.config import load_config
    from streamnode.node import build_engine

    config = load_config(overrides={"model.id": "tiny-sdxl", "model.device": "cpu", "stream.width": SIZE,
                                    "stream.height": SIZE, "stream.t_index_list": [35], "stream.prompt": "waves"})
    engine = build_engine(config, components=c)
    out = engine((np.arange(SIZE * SIZE * 3) % 251).astype(np.uint8).reshape(SIZE, SIZE, 3))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    engine.close()


# -- loading by what the folder declares -----------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("streamnode_*.json"))
    return dst


def test_family_comes_from_the_folder_never_its_name(tmp_path: Path, tiny_model_path: Path) -> None:
    from streamnode.diffusion.tiny_sdxl import ensure_tiny_sdxl_model

    xl_named_sd = _copy(ensure_tiny_sdxl_model(), tmp_path / "stable-diffusion-v1-5")
    sd_named_xl = _copy(tiny_model_path, tmp_path / "sdxl-turbo")
    assert inspect_folder(xl_named_sd).family == "sdxl"
    assert inspect_folder(sd_named_xl).family == "sd"
    # Without model_index.json, each component's own config still says what it is.
    (xl_named_sd / "model_index.json").unlink()
    layout = inspect_folder(xl_named_sd)
    assert layout.family == "sdxl" and layout.classes["text_encoder_2"] == "CLIPTextModelWithProjection"
    loaded = load_components(str(xl_named_sd), device="cpu", dtype="float32")
    assert loaded.family == "sdxl" and loaded.text_encoder_2 is not None


def test_a_declared_tiny_vae_is_loaded_as_the_tiny_vae(tmp_path: Path, tiny_model_path: Path) -> None:
    """A folder whose vae/ is an AutoencoderTiny (as some turbo repacks ship): it is the tiny VAE,
    loaded as one even when the full VAE was asked for."""
    from diffusers import AutoencoderTiny

    folder = _copy(tiny_model_path, tmp_path / "model")
    shutil.rmtree(folder / "vae")
    (folder / "vae_tiny").rename(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for use_tiny in (False, True):
        loaded = load_components(str(folder), device="cpu", dtype="float32", use_tiny_vae=use_tiny)
        assert isinstance(loaded.vae, AutoencoderTiny) and loaded.tiny_vae
        with torch.inference_mode():
            assert loaded.decode_latents(loaded.encode_image(torch.zeros(1, 3, 64, 64))).shape == (1, 3, 64, 64)


def test_the_full_vae_is_not_read_when_the_tiny_one_replaces_it(tmp_path: Path) -> None:
    from streamnode.diffusion.tiny_sdxl import ensure_tiny_sdxl_model

    folder = _copy(ensure_tiny_sdxl_model(), tmp_path / "model")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    assert load_components(str(folder), device="cpu", dtype="float32", use_tiny_vae=True).tiny_vae
    with pytest.raises(ModelLoadError, match="could not load"):
        load_components(str(folder), device="cpu", dtype="float32", use_tiny_vae=False)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_models_of_other_families_are_refused_with_one_line(tmp_path: Path, tiny_model_path: Path) -> None:
    from streamnode.diffusion.tiny_sdxl import ensure_tiny_sdxl_model

    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    cases = {sd3: "StableDiffusion3Pipeline has no UNet"}
    other = _copy(tiny_model_path, tmp_path / "text-embed")
    _edit_json(other / "unet" / "config.json", addition_embed_type="text")
    cases[other] = "addition_embed_type is 'text'"
    inpaint = _copy(tiny_model_path, tmp_path / "inpaint")
    _edit_json(inpaint / "unet" / "config.json", in_channels=9)
    cases[inpaint] = "inpainting"
    no_second = _copy(ensure_tiny_sdxl_model(), tmp_path / "no-te2")
    shutil.rmtree(no_second / "text_encoder_2")
    cases[no_second] = "needs text_encoder_2/"
    odd_vae = _copy(tiny_model_path, tmp_path / "odd-vae")
    _edit_json(odd_vae / "model_index.json", vae=["diffusers", "AutoencoderKLTemporalDecoder"])
    cases[odd_vae] = "vae/ is a AutoencoderKLTemporalDecoder"
    for folder, expect in cases.items():
        with pytest.raises(ModelLoadError) as err:
            load_components(str(folder), device="cpu")
        message = str(err.value)
        assert expect in message and "\n" not in message, message
        assert "SDXL" in message or "text_encoder_2" in message or "inpainting" in message


def test_a_single_file_checkpoint_s_family_is_read_from_its_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    xl = tmp_path / "any-name.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(xl))
    sd = tmp_path / "sdxl-lightning.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(sd))
    refiner = tmp_path / "r.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}, str(refiner))
    assert single_file_family(xl) == "sdxl"
    assert single_file_family(sd) == "sd"
    with pytest.raises(ModelLoadError, match="xl_refiner"):
        single_file_family(refiner)
    # Offline and without the base config cached: one line naming the family it was read as.
    with pytest.raises(ModelLoadError, match=r"\(sdxl checkpoint\)"):
        load_components(str(xl), device="cpu", use_tiny_vae=False)

