"""Tiny model build → save → load through the public loader, and the loader's error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamnode.diffusion import tiny
from streamnode.diffusion.models import ModelLoadError, load_components


def test_tiny_is_a_plain_diffusers_folder_of_safetensors(tiny_model_path: Path) -> None:
    for sub in ("unet", "vae", "vae_tiny", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_path / sub).is_dir(), sub
    weights = list(tiny_model_path.rglob("*.safetensors"))
    assert len(weights) == 4
    assert not [p for p in tiny_model_path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_tiny_loads_with_real_classes(tiny_components) -> None:
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    c = tiny_components
    assert isinstance(c.unet, UNet2DConditionModel)
    assert isinstance(c.vae, AutoencoderTiny) and c.tiny_vae
    assert isinstance(c.text_encoder, CLIPTextModel)
    assert isinstance(c.tokenizer, CLIPTokenizer)
    assert isinstance(c.scheduler, LCMScheduler)
    assert c.cross_attention_dim == c.text_encoder.config.hidden_size
    assert c.vae_scale_factor == 8


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_model_path: Path) -> None:
    from safetensors.torch import load_file

    tiny.build_tiny_model(tmp_path / "again")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tiny_model_path / rel), load_file(tmp_path / "again" / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_tiny_round_trip_through_the_folder_loader(tiny_model_path: Path, tiny_components) -> None:
    """Loading the cached folder by path gives the very same network as `--model tiny`."""
    by_path = load_components(str(tiny_model_path), device="cpu", dtype="float32")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500])
    emb = tiny_components.encode_text(["a cat", "a dog"])
    assert torch.equal(emb, by_path.encode_text(["a cat", "a dog"]))
    with torch.inference_mode():
        a = tiny_components.unet(x, t, emb).sample
        b = by_path.unet(x, t, emb).sample
    assert torch.equal(a, b)


def test_tokenizer_behaves_like_clip(tiny_components) -> None:
    tok = tiny_components.tokenizer
    ids = tok("a cat in the rain " * 40, truncation=True, max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    padded = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)
    assert tok("A CAT").input_ids == tok("a cat").input_ids  # CLIP lower-cases
    emb = tiny_components.encode_text(["x " * 300, ""])
    assert emb.shape == (2, 77, tiny_components.cross_attention_dim)
    assert not torch.equal(emb[0], emb[1])


def test_vae_round_trip_shapes(tiny_components) -> None:
    img = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        z = tiny_components.encode_image(img)
        out = tiny_components.decode_latents(z)
    assert z.shape == (1, 4, 8, 12)
    assert out.shape == img.shape and torch.isfinite(out).all()


def test_full_vae_variant(tiny_model_path: Path) -> None:
    from diffusers import AutoencoderKL

    c = load_components("tiny", device="cpu", dtype="float32", use_tiny_vae=False)
    assert isinstance(c.vae, AutoencoderKL) and not c.tiny_vae
    assert "vae=full" in c.identity
    with torch.inference_mode():
        z = c.encode_image(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 4, 8, 8)


def test_identity_follows_the_weights(tmp_path: Path, tiny_model_path: Path) -> None:
    import shutil

    from streamnode.diffusion.models import _identity_of

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    assert _identity_of(copy) == _identity_of(tiny_model_path)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _identity_of(copy) != _identity_of(tiny_model_path)


def test_identity_follows_the_configs(tmp_path: Path, tiny_model_path: Path) -> None:
    import shutil

    from streamnode.diffusion.models import _identity_of

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    config = copy / "unet" / "config.json"
    data = json.loads(config.read_text())
    data["attention_head_dim"] = 8
    config.write_text(json.dumps(data))
    assert _identity_of(copy) != _identity_of(tiny_model_path)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_components(str(tmp_path), device="cpu")


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_components(str(ckpt), device="cpu")


def test_unknown_path_is_not_mistaken_for_a_hub_id() -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_components("./missing-model", device="cpu")


def test_offline_hub_id_gives_one_clear_line() -> None:
    with pytest.raises(ModelLoadError) as err:
        load_components("someone/not-cached-anywhere", device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert "--model tiny" in message and "local diffusers folder" in message


def test_cuda_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="--device cpu"):
        load_components("tiny", device="cuda")


def test_cli_presets_and_doctor() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamnode.cli", "presets"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "demo" in out.stdout and "sd-turbo" in out.stdout
    doctor = subprocess.run(
        [sys.executable, "-m", "streamnode.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert doctor.returncode == 0
    assert "torch" in doctor.stdout and "ndi-python" in doctor.stdout and "SpoutGL" in doctor.stdout
    # The model families it can load, each with what it covers.
    assert "model:sd " in doctor.stdout and "model:sdxl" in doctor.stdout and "SDXL-Turbo" in doctor.stdout
