"""Engine cache: every key field matters, bad files are rejected and rebuilt, profiles cover needs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from streamnode.accel.cache import (
    ENGINE_FORMAT_VERSION,
    EngineCache,
    EngineCacheError,
    EngineKey,
    EngineLoadError,
    misses_filled_by,
    obtain_engine,
)
from streamnode.accel.profile import EngineProfile, ProfileError, profile_for, profile_for_config, unet_rows


def _profile(**kw: int) -> EngineProfile:
    base = dict(min_batch=1, opt_batch=2, max_batch=4, vae_max_batch=1, min_size=256, max_size=1024,
                opt_height=512, opt_width=512)
    base.update(kw)
    return EngineProfile(**base)


def _key(**kw: object) -> EngineKey:
    base: dict[str, object] = dict(
        component="unet",
        model="stabilityai/sd-turbo@1a2b3c|taesd=taesd",
        weights="f" * 24,
        lora="",
        vae_kind="taesd",
        profile=_profile(),
        dtype="float16",
        runtime_version="10.13.0",
        device_name="NVIDIA H100 80GB HBM3",
        device_detail="9.0",
    )
    base.update(kw)
    return EngineKey(**base)  # type: ignore[arg-type]


# Each field the issue names, changed on its own.
FIELD_CHANGES = {
    "component": "vae_decoder",
    "model": "stabilityai/sd-turbo@ffffff|taesd=taesd",  # other weights or hub revision
    "weights": "0" * 24,
    "lora": "latent-consistency/lcm-lora-sdv1-5",
    "vae_kind": "full",
    "profile": _profile(max_size=768),
    "dtype": "bfloat16",
    "runtime_version": "11.4.0",
    "device_name": "NVIDIA GeForce RTX 4090",
    "device_detail": "8.9",
    "format_version": ENGINE_FORMAT_VERSION + 1,
    "runtime": "openvino",
}


def test_every_key_field_is_covered_by_the_test() -> None:
    assert set(FIELD_CHANGES) == {f.name for f in dataclasses.fields(EngineKey)}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_key_changes_with_every_field(field: str) -> None:
    base = _key()
    other = dataclasses.replace(base, **{field: FIELD_CHANGES[field]})
    assert other.digest() != base.digest()


@pytest.mark.parametrize("field", sorted(f for f in FIELD_CHANGES if f not in ("component", "profile")))
def test_an_engine_for_another_key_is_never_loaded(tmp_path: Path, field: str) -> None:
    cache = EngineCache(tmp_path)
    stored = dataclasses.replace(_key(), **{field: FIELD_CHANGES[field]})
    cache.store(stored, b"engine for another key")
    assert cache.find(_key()) is None
    assert _key().mismatch(stored) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [("opt_height", 576), ("opt_width", 768), ("opt_batch", 1), ("vae_max_batch", 1)],
)
def test_profile_fields_change_the_key(field: str, value: int) -> None:
    p = _profile(vae_max_batch=2)
    changed = dataclasses.replace(p, **{field: value})
    assert _key(profile=p).digest() != _key(profile=changed).digest()


def test_resolution_range_is_in_the_key() -> None:
    """The original's stale-engine bug: a 512-only engine must never serve a 768 stream."""
    narrow = _key(profile=_profile(min_size=512, max_size=512))
    wide = _key(profile=_profile(min_size=256, max_size=1024))
    assert narrow.digest() != wide.digest()
    assert wide.mismatch(narrow) is not None  # narrow does not cover wide's need
    assert narrow.mismatch(wide) is None  # but a wide engine serves a narrow need


def test_store_then_find_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    entry = cache.store(_key(), b"\x00plan" * 100, build_seconds=12.5)
    meta = json.loads(entry.sidecar_path.read_text())
    assert meta["key"] == _key().to_dict()
    assert meta["size"] == 500 and len(meta["sha256"]) == 64
    found = cache.find(_key())
    assert found is not None and found.engine_path.read_bytes() == b"\x00plan" * 100
    assert cache.estimate_seconds(_key()) == 12.5


def test_wider_cached_engine_is_reused_and_narrower_one_is_not(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    wide = _key(profile=_profile(max_batch=8, min_size=256, max_size=1024))
    cache.store(wide, b"wide")
    need = _key(profile=_profile(max_batch=2, opt_batch=1, min_size=512, max_size=768, opt_height=512, opt_width=512))
    found = cache.find(need)
    assert found is not None and found.key == wide
    too_big = _key(profile=_profile(max_batch=16))
    assert cache.find(too_big) is None


def test_tightest_covering_engine_wins(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    huge = _key(profile=_profile(max_batch=16, max_size=2048))
    snug = _key(profile=_profile(max_batch=4, max_size=1024, opt_batch=1))
    cache.store(huge, b"huge")
    cache.store(snug, b"snug")
    found = cache.find(_key(profile=_profile(max_batch=2, opt_batch=2, max_size=768)))
    assert found is not None and found.key == snug


class Builder:
    def __init__(self, payload: bytes = b"good engine") -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self) -> bytes:
        self.calls += 1
        return self.payload


def _load(entry):  # noqa: ANN001, ANN202
    data = entry.engine_path.read_bytes()
    if not data.startswith(b"good"):
        raise EngineLoadError("not a TensorRT plan")
    return data


def test_missing_engine_is_built_once_then_loaded(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    engine, _, built = obtain_engine(cache, _key(), build=build, load=_load)
    assert (engine, built, build.calls) == (b"good engine", True, 1)
    engine, _, built = obtain_engine(cache, _key(), build=build, load=_load)
    assert (built, build.calls) == (False, 1)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_sidecar", "garble_sidecar", "edit_key", "drop_plan"])
def test_corrupt_or_mismatched_files_are_rejected_and_rebuilt(tmp_path: Path, damage: str, caplog) -> None:  # noqa: ANN001
    cache, build = EngineCache(tmp_path), Builder()
    _, entry, _ = obtain_engine(cache, _key(), build=build, load=_load)
    plan, sidecar = entry.engine_path, entry.sidecar_path
    if damage == "flip_byte":
        data = bytearray(plan.read_bytes())
        data[-1] ^= 0xFF
        plan.write_bytes(bytes(data))
    elif damage == "truncate":
        plan.write_bytes(plan.read_bytes()[:4])
    elif damage == "drop_sidecar":
        sidecar.unlink()
    elif damage == "garble_sidecar":
        sidecar.write_text("{not json")
    elif damage == "edit_key":
        meta = json.loads(sidecar.read_text())
        meta["key"]["device_name"] = "NVIDIA GeForce RTX 3060"  # e.g. a cache folder copied between machines
        sidecar.write_text(json.dumps(meta))
    elif damage == "drop_plan":
        plan.unlink()
    with caplog.at_level("WARNING"):
        engine, entry2, built = obtain_engine(cache, _key(), build=build, load=_load)
    assert built and build.calls == 2 and engine == b"good engine"
    assert "rejecting" in caplog.text
    assert cache.find(_key()) == entry2  # and the rebuilt one is valid


def test_plan_that_fails_to_deserialize_is_rebuilt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    # A file with a valid sidecar whose content TensorRT refuses (e.g. written by another build).
    cache.store(_key(), b"junk from another TensorRT build")
    build = Builder()
    engine, _, built = obtain_engine(cache, _key(), build=build, load=_load)
    assert built and build.calls == 1 and engine == b"good engine"


def test_fresh_build_that_fails_to_load_is_an_error_not_a_loop(tmp_path: Path) -> None:
    build = Builder(b"junk")
    with pytest.raises(EngineLoadError):
        obtain_engine(EngineCache(tmp_path), _key(), build=build, load=_load)
    assert build.calls == 1


def test_no_build_when_building_is_off(tmp_path: Path) -> None:
    build = Builder()
    with pytest.raises(EngineCacheError, match="building is off"):
        obtain_engine(EngineCache(tmp_path), _key(), build=build, load=_load, allow_build=False)
    assert build.calls == 0


def test_force_rebuilds_a_valid_engine(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    obtain_engine(cache, _key(), build=build, load=_load)
    obtain_engine(cache, _key(), build=build, load=_load, force=True)
    assert build.calls == 2


def test_default_root_is_under_the_user_cache(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    monkeypatch.setenv("STREAMNODE_CACHE", str(tmp_path))
    assert EngineCache().root == tmp_path / "engines"


# -- profiles --------------------------------------------------------------------------------


def test_unet_rows_per_cfg_mode() -> None:
    assert [unet_rows(c, 2, 3) for c in ("none", "full", "self", "initialize")] == [6, 12, 6, 9]


def test_default_profile_covers_every_cfg_mode_and_fewer_steps() -> None:
    p = profile_for(steps=2, frames=1, width=512, height=512, cfg_type="self")
    assert (p.min_batch, p.opt_batch, p.max_batch) == (1, 2, 4)
    for cfg in ("none", "full", "self", "initialize"):
        for steps in (1, 2):
            assert unet_rows(cfg, steps, 1) <= p.max_batch
    assert (p.min_size, p.max_size) == (256, 1024)


def test_profile_does_not_depend_on_cfg_mode_for_coverage() -> None:
    a = profile_for(steps=2, frames=2, width=512, height=512, cfg_type="none")
    b = profile_for(steps=2, frames=2, width=768, height=512, cfg_type="full")
    assert a.covers(b) and b.covers(a)  # switching cfg or resolution reuses the engine


def test_profile_rejects_a_batch_too_small_for_the_cfg_mode() -> None:
    with pytest.raises(ProfileError, match="engine_max_batch 2"):
        profile_for(steps=2, frames=1, width=512, height=512, cfg_type="full", max_batch=2)


def test_accepts_size_names_the_fix() -> None:
    p = _profile(min_size=256, max_size=768)
    assert p.accepts_size(512, 768) is None
    assert "engine_max_size" in (p.accepts_size(1024, 512) or "")
    assert "multiple of 64" in (p.accepts_size(720, 1280) or "")


def test_profile_for_config_uses_the_model_fields() -> None:
    from streamnode.config import load_config

    cfg = load_config(preset="lcm-sd15", sets=["model.engine_min_size=384", "model.engine_max_size=768"])
    p = profile_for_config(cfg)
    assert (p.min_size, p.max_size, p.max_batch, p.opt_batch) == (384, 768, 4, 2)


def test_config_rejects_bad_engine_ranges() -> None:
    from streamnode.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="multiple of 64"):
        load_config(sets=["model.engine_max_size=1000"])
    with pytest.raises(ConfigError, match="above engine_max_size"):
        load_config(sets=["model.engine_min_size=1024", "model.engine_max_size=512"])


def test_out_of_memory_at_load_keeps_the_engine(tmp_path: Path) -> None:
    """Running out of memory while loading is not the file's fault: it is kept for the next start."""
    import torch

    cache, build = EngineCache(tmp_path), Builder()
    obtain_engine(cache, _key(), build=build, load=_load)

    def oom(_entry):  # noqa: ANN001, ANN202
        raise torch.cuda.OutOfMemoryError("no execution context")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        obtain_engine(cache, _key(), build=build, load=oom)
    assert build.calls == 1 and cache.find(_key()) is not None


# -- keys from loaded weights (CPU: TensorRT itself is not needed to compute them) -------------


def test_weights_fingerprint_is_stable_and_sees_a_fused_lora(tiny_components) -> None:  # noqa: ANN001
    import torch

    from streamnode.accel.onnx_export import component_module
    from streamnode.accel.tensorrt import weights_fingerprint

    unet = component_module(tiny_components, "unet")
    first = weights_fingerprint(unet)
    assert weights_fingerprint(unet) == first
    proj = tiny_components.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    saved = proj.detach().clone()
    try:
        with torch.no_grad():  # what fusing a LoRA does: W += B·A, a dense low-rank update
            proj += 1e-3 * torch.randn(proj.shape[0], 2) @ torch.randn(2, proj.shape[1])
        assert weights_fingerprint(unet) != first
    finally:
        with torch.no_grad():
            proj.copy_(saved)
    assert weights_fingerprint(unet) == first
    assert weights_fingerprint(component_module(tiny_components, "vae_decoder")) != first


def test_make_key_reads_lora_and_vae_kind(tiny_components) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from streamnode.accel.tensorrt import make_key

    fake = SimpleNamespace(**{k: getattr(tiny_components, k) for k in ("unet", "vae", "dtype")},
                           identity="org/model@abc|lora=latent-consistency/lcm-lora-sdv1-5|vae=full", tiny_vae=False)
    key = make_key(fake, "unet", _profile(), trt_version="10.13.0", gpu_name="GPU", compute_capability="8.9",
                   weights="w")
    assert (key.lora, key.vae_kind, key.dtype) == ("latent-consistency/lcm-lora-sdv1-5", "full", "float32")
    real = make_key(tiny_components, "vae_decoder", _profile(), trt_version="10.13.0", gpu_name="GPU",
                    compute_capability="8.9")
    assert real.lora == "" and real.vae_kind == "taesd" and real.model == tiny_components.identity


def test_trt_profile_shapes_and_run_time_acceptance() -> None:
    from streamnode.accel.tensorrt import input_shapes, seam_acceptors

    p = profile_for(steps=2, frames=2, width=768, height=512, min_size=256, max_size=1024)
    unet = input_shapes("unet", p, text_dim=1024)
    assert unet["sample"] == ((1, 4, 32, 32), (4, 4, 64, 96), (8, 4, 128, 128))
    assert unet["encoder_hidden_states"][2] == (8, 77, 1024)
    assert input_shapes("vae_encoder", p)["images"][2] == (2, 3, 1024, 1024)
    assert input_shapes("vae_decoder", p)["latents"][0] == (1, 4, 32, 32)

    import torch

    accepts = seam_acceptors(p, 8)
    t = torch.zeros(8, dtype=torch.long)
    assert accepts["unet_call"](torch.zeros(8, 4, 64, 96), t, torch.zeros(8, 77, 4)) is None
    assert "batch 9" in accepts["unet_call"](torch.zeros(9, 4, 64, 64), t, None)
    assert "outside the engine range" in accepts["vae_encode"](torch.zeros(1, 3, 1280, 512))
    assert "multiple of 64" in accepts["vae_decode"](torch.zeros(1, 4, 90, 160))


def test_an_openvino_model_serves_only_its_own_shape(tmp_path: Path) -> None:
    """OpenVINO models are compiled static: a 'wider' entry is another shape, never a match."""
    cache = EngineCache(tmp_path)
    exact = _profile(min_batch=2, opt_batch=2, max_batch=2, vae_max_batch=1, min_size=512, max_size=512)
    want = _key(runtime="openvino", profile=exact)
    wider = dataclasses.replace(want, profile=_profile(min_batch=1, opt_batch=2, max_batch=4))
    cache.store(wider, b"a model compiled for other shapes")
    assert cache.find(want) is None
    assert "compiled for" in (want.mismatch(wider) or "")
    cache.store(want, b"the model for this shape")
    found = cache.find(want)
    assert found is not None and found.key == want
    # The same digest never crosses runtimes: a TensorRT key with that profile is another entry.
    assert dataclasses.replace(want, runtime="tensorrt").digest() != want.digest()


def test_weights_fingerprint_of_a_tensor_as_big_as_an_sd_unet_conv() -> None:
    """29,491,200 values (SD's 2560→1280 3×3 up-block conv): float32 indices ran past the end."""
    import torch

    from streamnode.accel.cache import weights_fingerprint

    module = torch.nn.Module()
    module.register_buffer("w", torch.zeros(1280, 2560, 3, 3, dtype=torch.float16))
    first = weights_fingerprint(module)
    module.w[-1, -1, -1, -1] = 1.0  # the last value is one of the samples
    assert weights_fingerprint(module) != first


# -- a miss built elsewhere (a model switch's other process: node/prebuild.py) ------------------


class Elsewhere:
    """Stands for the other process: stores what it builds into the same cache folder."""

    def __init__(self, cache: EngineCache, keys: list[EngineKey], fail: bool = False) -> None:
        self.cache, self.keys, self.fail, self.calls = cache, keys, fail, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the build process exited with 1: out of memory")
        for key in self.keys:
            self.cache.store(key, b"good engine from elsewhere")


def test_a_miss_under_a_fill_is_built_elsewhere_and_loaded_here(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builder()
    unet, decoder = _key(), _key(component="vae_decoder")
    elsewhere = Elsewhere(EngineCache(tmp_path), [unet, decoder])
    with misses_filled_by(elsewhere):
        engine, _, built = obtain_engine(cache, unet, build=build, load=_load)
        assert (engine, built, build.calls) == (b"good engine from elsewhere", False, 0)
        obtain_engine(cache, decoder, build=build, load=_load)  # a hit now: nothing asked elsewhere
    assert elsewhere.calls == 1
    obtain_engine(EngineCache(tmp_path), _key(component="vae_encoder"), build=build, load=_load)
    assert (elsewhere.calls, build.calls) == (1, 1), "outside the block a miss is built here"


@pytest.mark.parametrize("fail", [True, False])
def test_a_fill_that_fails_or_leaves_another_key_falls_back_to_building_here(tmp_path: Path, fail: bool,
                                                                              caplog) -> None:  # noqa: ANN001
    cache, build = EngineCache(tmp_path), Builder()
    elsewhere = Elsewhere(cache, [_key(device_name="another GPU")], fail=fail)
    with caplog.at_level("WARNING"), misses_filled_by(elsewhere):
        engine, _, built = obtain_engine(cache, _key(), build=build, load=_load)
    assert (engine, built, build.calls, elsewhere.calls) == (b"good engine", True, 1, 1)
    assert ("out of memory" if fail else "left no unet") in caplog.text
