"""The LoRA stack on the tiny models: LoRAs made here (random, non-zero), each engine on its own
UNet copy. The oracle for the runtime adapters is diffusers/PEFT's own adapter stack on the same
files; merged must equal runtime; weight 0 must be the base model, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import ATTENTION, make_lora, private, to_kohya

from streamnode.diffusion.lora import LoraError, read_lora
from streamnode.diffusion.stream import StreamEngine

SIZE = 64
FRAME = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
TARGETS = [*ATTENTION, "proj_in", "conv1"]  # linear and convolution layers (3×3 and SD1's 1×1 proj_in)


@pytest.fixture(scope="module")
def files(tiny_components, tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(tiny_components.unet, root / "a", seed=1, targets=TARGETS, rank=4, alpha=8.0)
    b = make_lora(tiny_components.unet, root / "b", seed=2, targets=ATTENTION, rank=2, alpha=2.0)
    return {"a": a, "b": b, "a_kohya": to_kohya(a, root / "a_kohya.safetensors", alpha=8.0)}


def engine_on(components, *, mode: str = "runtime", **kw) -> StreamEngine:  # noqa: ANN001
    engine = StreamEngine.from_components(private(components), t_index_list=[30], width=SIZE, height=SIZE,
                                          cfg_type="none", similarity_threshold=0.0, lora_mode=mode, **kw)
    engine.prepare(prompt="a harbour at dawn")
    return engine


def latent(engine: StreamEngine, frame: np.ndarray = FRAME) -> torch.Tensor:
    """The x0 that leaves the stream for this frame (before the decoder, which clamps much)."""
    seen: list[torch.Tensor] = []
    decode = engine.vae_decode
    engine.vae_decode = lambda z: (seen.append(z.clone()), decode(z))[1]
    try:
        engine(frame)
    finally:
        engine.vae_decode = decode
    return seen[-1]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def base(tiny_components) -> torch.Tensor:  # noqa: ANN001
    engine = engine_on(tiny_components)
    out = latent(engine)
    engine.close()
    return out


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["runtime", "merged"])
def test_weight_zero_is_the_base_model(tiny_components, files, base, mode: str) -> None:  # noqa: ANN001
    engine = engine_on(tiny_components, mode=mode)
    engine.update(lora=(0, {"source": str(files["a"]), "weight": 0.0}))
    assert engine.loras.active == 1
    assert maxdiff(latent(engine), base) == 0.0
    engine.update(lora=(0, "weight", 0.8))
    assert maxdiff(latent(engine), base) > 1e-2  # a LoRA that does something
    engine.update(lora=(0, "enabled", False))  # off keeps the weight, and is the base again
    assert maxdiff(latent(engine), base) == 0.0 and engine.live_params().loras[0].weight == 0.8
    engine.close()


def test_runtime_equals_diffusers_peft_adapters(tiny_components, files) -> None:  # noqa: ANN001
    """Two LoRAs (different ranks and alphas) at two weights: diffusers' own adapter stack
    (`load_lora_adapter` + `set_adapters`) on the same files is the reference."""
    ours = engine_on(tiny_components)
    ours.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
    ours.update(lora=(3, {"source": str(files["b"]), "weight": -0.4}))

    reference = private(tiny_components)
    for name, file in (("a", files["a"]), ("b", files["b"])):
        reference.unet.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet", adapter_name=name)
    reference.unet.set_adapters(["a", "b"], [0.7, -0.4])
    theirs = StreamEngine.from_components(reference, t_index_list=[30], width=SIZE, height=SIZE, cfg_type="none",
                                          similarity_threshold=0.0)
    theirs.prepare(prompt="a harbour at dawn")
    assert maxdiff(latent(ours), latent(theirs)) <= 1e-5
    ours.close()


def test_merged_equals_runtime_at_the_same_weights(tiny_components, files) -> None:  # noqa: ANN001
    out = {}
    for mode in ("runtime", "merged"):
        engine = engine_on(tiny_components, mode=mode)
        engine.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
        engine.update(lora=(1, {"source": str(files["b"]), "weight": 1.3}))
        engine.update(lora=(0, "weight", 0.45))  # a fader move: merged re-merges from W0
        out[mode] = latent(engine)
        engine.close()
    assert maxdiff(out["runtime"], out["merged"]) <= 1e-5


def test_kohya_layout_reads_as_the_same_lora(tiny_components, files) -> None:  # noqa: ANN001
    unet = tiny_components.unet
    a, k = read_lora(str(files["a"]), unet), read_lora(str(files["a_kohya"]), unet)
    assert a.factors.keys() == k.factors.keys() and len(a.factors) > 10
    for layer in a.factors:
        assert maxdiff(a.factors[layer].delta(), k.factors[layer].delta()) <= 1e-6, layer
    # α/r = 8/4 is in the factors: the update is twice B·A of the file.
    from safetensors.torch import load_file

    raw = load_file(str(files["a"]))
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    expect = raw[f"unet.{layer}.lora_B.weight"] @ raw[f"unet.{layer}.lora_A.weight"] * 2.0
    assert maxdiff(a.factors[layer].delta(), expect) <= 1e-6


def test_a_weight_change_shows_on_the_next_frame(tiny_components, files) -> None:  # noqa: ANN001
    engine = engine_on(tiny_components)
    engine.update(lora=(0, {"source": str(files["a"]), "weight": 1.0}))
    latent(engine)
    engine.update(lora=(0, "weight", 0.25))
    after = latent(engine)
    fresh = engine_on(tiny_components)
    fresh.update(lora=(0, {"source": str(files["a"]), "weight": 0.25}))
    assert maxdiff(after, latent(fresh)) <= 1e-6
    engine.close()
    fresh.close()


@pytest.mark.parametrize("mode", ["runtime", "merged"])
def test_clear_and_close_give_the_unet_back_as_loaded(tiny_components, files, base, mode: str) -> None:  # noqa: ANN001
    engine = engine_on(tiny_components, mode=mode)
    unet = engine.components.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    engine.update(lora=(0, {"source": str(files["a"]), "weight": 0.9}))
    engine.update(lora=(1, {"source": str(files["b"]), "weight": 0.5}))
    engine.update(lora=(0, "clear", None))
    engine.update(lora=(1, "clear", None))
    assert engine.live_params().loras == {} and maxdiff(latent(engine), base) == 0.0
    engine.update(lora=(2, {"source": str(files["a"]), "weight": 0.9}))
    engine.close()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in unet.modules())


def test_the_text_encoder_part_is_skipped_with_one_line(tiny_components, tmp_path, caplog) -> None:  # noqa: ANN001
    file = make_lora(tiny_components.unet, tmp_path, seed=3, targets=ATTENTION,
                     text_encoder=tiny_components.text_encoder)
    with caplog.at_level("INFO", logger="streamnode.diffusion.lora"):
        weights = read_lora(str(file), tiny_components.unet)
    assert weights.skipped > 0 and weights.factors
    assert [r for r in caplog.records if "not applied" in r.getMessage()]


def test_sdxl_lora_runtime_merged_and_zero(tiny_sdxl_components, tmp_path) -> None:  # noqa: ANN001
    """On the SDXL UNet, including the layers only SDXL has (the text_time addition embedding)."""
    file = make_lora(tiny_sdxl_components.unet, tmp_path, seed=4, targets=[*ATTENTION, "linear_1", "linear_2"])
    assert any(k.startswith("add_embedding") for k in read_lora(str(file), tiny_sdxl_components.unet).factors)
    base = latent(engine_on(tiny_sdxl_components))
    out = {}
    for mode in ("runtime", "merged"):
        engine = engine_on(tiny_sdxl_components, mode=mode)
        engine.update(lora=(0, {"source": str(file), "weight": 0.0}))
        assert maxdiff(latent(engine), base) == 0.0
        engine.update(lora=(0, "weight", 0.6))
        out[mode] = latent(engine)
        engine.close()
    assert maxdiff(out["runtime"], base) > 1e-2 and maxdiff(out["runtime"], out["merged"]) <= 1e-5


def test_lcm_lora_fused_at_load_is_the_lora_at_weight_one(tiny_model_path, files) -> None:  # noqa: ANN001
    from streamnode.diffusion.models import load_components

    fused = load_components("tiny", device="cpu", dtype="float32", lcm_lora=str(files["a"]))
    assert "lora=" in fused.identity
    stacked = engine_on(load_components("tiny", device="cpu", dtype="float32"), mode="runtime")
    stacked.update(lora=(0, {"source": str(files["a"]), "weight": 1.0}))
    plain = StreamEngine.from_components(fused, t_index_list=[30], width=SIZE, height=SIZE, cfg_type="none",
                                         similarity_threshold=0.0)
    plain.prepare(prompt="a harbour at dawn")
    assert maxdiff(latent(plain), latent(stacked)) <= 1e-5


# -- refused LoRAs -------------------------------------------------------------------------------


def _foreign_lora(path: Path) -> Path:
    """Layers named as in this UNet but shaped for SD1.5 (768-wide text, 320-wide blocks)."""
    from safetensors.torch import save_file

    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    save_file({f"{layer}.to_k.lora_A.weight": torch.randn(4, 768), f"{layer}.to_k.lora_B.weight": torch.randn(320, 4),
               f"{layer}.to_q.lora_A.weight": torch.randn(4, 320), f"{layer}.to_q.lora_B.weight": torch.randn(320, 4)},
              str(path))
    return path


def test_bad_loras_are_refused_with_one_line_and_change_nothing(tiny_components, files, base, tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    ckpt = tmp_path / "style.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    pickles_only = tmp_path / "downloaded"
    pickles_only.mkdir()
    (pickles_only / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    cases = {
        str(_foreign_lora(tmp_path / "sd15.safetensors")): "made for another base model",
        str(tmp_path / "missing.safetensors"): "no such LoRA file",
        str(garbage): "not a readable safetensors file",
        str(loha): "LoHa/LoKr/DoRA",
        "someone/not-cached-lora": "offline",
        str(pickles_only): "no .safetensors file in this folder (pytorch_lora_weights.bin: pickle",
        str(tmp_path): "3 .safetensors files here; name the one to use",
    }
    engine = engine_on(tiny_components, mode="merged")
    engine.update(lora=(0, {"source": str(files["b"]), "weight": 0.5}))
    with_b = latent(engine)
    for source, expect in cases.items():
        with pytest.raises(LoraError) as err:
            engine.update(lora=(1, "source", source))
        assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="pickle"):
        engine.update(lora=(1, "source", str(ckpt)))  # refused by the schema, before any file is touched
    assert set(engine.live_params().loras) == {0} and maxdiff(latent(engine), with_b) == 0.0
    engine.close()


def test_wrong_base_names_a_layer_that_does_not_fit(tiny_components, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(LoraError) as err:
        read_lora(str(_foreign_lora(tmp_path / "x.safetensors")), tiny_components.unet)
    message = str(err.value)
    assert "2 of 2 layers" in message and "attn2.to_" in message and "UNet" in message


def test_preset_and_config_carry_loras(files, tmp_path) -> None:  # noqa: ANN001
    from streamnode.config import ConfigError, load_config

    preset = tmp_path / "style.toml"
    preset.write_text(f'[model]\nlora_mode = "merged"\n\n[[loras]]\nsource = {json.dumps(str(files["a"]))}\n'
                      'weight = 0.6\n\n[[loras]]\nsource = "x.bin"\n')
    with pytest.raises(ConfigError, match="pickle"):
        load_config(preset_file=preset)
    preset.write_text(preset.read_text().replace('source = "x.bin"', "weight = 0.2"))
    config = load_config(preset_file=preset)
    assert config.model.lora_mode == "merged" and [lo.weight for lo in config.loras] == [0.6, 0.2]
    with pytest.raises(ConfigError, match="max_loras"):
        load_config(preset_file=preset, sets=["runtime.max_loras=1"])


# -- with an accelerated UNet ----------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_follows_lora_weights_and_hands_new_hooks_to_pytorch(tiny_components, files) -> None:  # noqa: ANN001
    """Dynamo plumbing (its "eager" backend; inductor reads the weights the same way): merged
    weights and runtime scales change in place and the compiled UNet follows them; a runtime
    LoRA added after the trace cannot be seen by it, so the UNet goes to PyTorch, said once."""
    from streamnode.accel import accelerate, describe_seams

    def reference(mode: str, weights: dict[int, float]) -> torch.Tensor:
        eager = engine_on(tiny_components, mode=mode)
        for i, w in weights.items():
            eager.update(lora=(i, {"source": str(files["ab"[i]]), "weight": w}))
        out = latent(eager)
        eager.close()
        return out

    merged = engine_on(tiny_components, mode="merged")
    assert accelerate(merged, "compile", compile_backend="eager") == "compile"
    merged.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
    assert maxdiff(latent(merged), reference("merged", {0: 0.7})) <= 1e-5
    merged.update(lora=(0, "weight", 0.3))
    assert maxdiff(latent(merged), reference("merged", {0: 0.3})) <= 1e-5
    assert describe_seams(merged)["unet_call"]["broken"] is None
    merged.close()

    runtime = engine_on(tiny_components, mode="runtime")
    runtime.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))  # before the trace: compiled in
    assert accelerate(runtime, "compile", compile_backend="eager") == "compile"
    runtime.update(lora=(0, "weight", 0.3))
    assert maxdiff(latent(runtime), reference("runtime", {0: 0.3})) <= 1e-5
    assert describe_seams(runtime)["unet_call"]["broken"] is None
    runtime.update(lora=(1, {"source": str(files["b"]), "weight": 0.5}))  # a new hook after the trace
    assert "runtime mode after torch.compile" in describe_seams(runtime)["unet_call"]["broken"]
    assert maxdiff(latent(runtime), reference("runtime", {0: 0.3, 1: 0.5})) <= 1e-5
    runtime.close()


def test_tensorrt_is_not_refitted_a_lora_change_sends_the_unet_to_pytorch(tiny_components, files, monkeypatch) -> None:  # noqa: ANN001
    """The node's own listener, with a stale engine standing in for a TensorRT UNet built on the
    weights before the change (a frozen copy of the UNet): after any LoRA change the UNet runs in
    PyTorch, with the LoRA, and the reason names the missing refit."""
    import copy

    import streamnode.accel as accel
    from streamnode.accel import GuardedCall

    engine = engine_on(tiny_components, mode="merged")
    frozen = copy.deepcopy(engine.components.unet)
    eager = engine.unet_call
    engine.unet_call = GuardedCall("unet_call", "tensorrt",
                                   lambda x, t, e: frozen(x, t, encoder_hidden_states=e).sample, eager)
    engine.on_weights_change(lambda structure: accel._weights_changed(engine, structure))
    base = latent(engine)
    engine.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
    assert "not refitted" in engine.unet_call.broken
    expect = engine_on(tiny_components, mode="merged")
    expect.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
    assert maxdiff(latent(engine), latent(expect)) <= 1e-5 and maxdiff(latent(engine), base) > 1e-2
    engine.close()
    expect.close()


def test_runtime_loras_are_refused_for_tensorrt_with_one_line(tiny_components, files, monkeypatch, caplog) -> None:  # noqa: ANN001
    """Past the TensorRT availability check (not installed here), the runtime stack stops the build
    before any export: the engine stays on PyTorch and one line says why and what to set."""
    import streamnode.accel.tensorrt as trt_module
    from streamnode.accel import accelerate

    monkeypatch.setattr(trt_module, "require_tensorrt", lambda: None)
    engine = engine_on(tiny_components, mode="runtime")
    engine.update(lora=(0, {"source": str(files["a"]), "weight": 0.7}))
    with caplog.at_level("WARNING", logger="streamnode.accel"):
        assert accelerate(engine, "tensorrt") == "eager"
    lines = [r.getMessage() for r in caplog.records if "runtime LoRAs" in r.getMessage()]
    assert len(lines) == 1 and 'lora_mode = "merged"' in lines[0]
    engine.close()


def test_build_engines_refuses_a_preset_with_runtime_loras(capsys) -> None:  # noqa: ANN001
    import argparse

    from streamnode.accel.build import EXIT_USAGE, add_build_engines_arguments, build_engines_command

    parser = argparse.ArgumentParser()
    add_build_engines_arguments(parser)
    assert build_engines_command(parser.parse_args(["--preset", "sdxl-turbo-lora"])) == EXIT_USAGE
    assert 'lora_mode = "merged"' in capsys.readouterr().err
