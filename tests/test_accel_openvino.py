"""OpenVINO backend on the CPU: the real StreamEngine on the tiny model, real OpenVINO compiles.

Parity: an OpenVINO engine and a PyTorch engine on the same weights, fed the same frames, give
the same uint8 frames within FP32_LEVELS for every cfg type, T ∈ {1, 2, 4}, F ∈ {1, 2}, with the
similarity filter, with brushes and after live updates. Steps and brushes are changed live, so
the new UNet shapes go through the background compiler, as in a show.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch

import streamnode.accel as accel
from streamnode.accel import GuardedCall, accelerate, backend_chain, describe_seams, restore
from streamnode.diffusion.stream import StreamEngine

ov = pytest.importorskip("openvino", reason='OpenVINO is not installed: pip install "streamnode[openvino]"')

SIZE = 64
FP32_LEVELS = 4
"""fp32 OpenVINO vs PyTorch: at most this many uint8 levels apart anywhere (measured ≤ 4 on the
trained tiny model, whose decoder passes rounding differences on where the random one flattened
them (≤ 1); a wrong model is tens of levels off)."""
T_LISTS = {1: [35], 2: [32, 45], 4: [16, 24, 32, 45]}


def _cpu_has_bf16() -> bool:
    return "BF16" in [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _frames(n: int, frames: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (frames, SIZE, SIZE, 3) if frames > 1 else (SIZE, SIZE, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _pair(components, *, frames: int = 1, cfg: str = "self", threads: int = 1, precision: str = "fp32"):  # noqa: ANN001, ANN202
    """(PyTorch engine, OpenVINO engine) built alike; the OpenVINO one accelerated and ready."""
    kw = dict(t_index_list=T_LISTS[1], width=SIZE, height=SIZE, frame_buffer_size=frames, cfg_type=cfg, seed=7)
    ref = StreamEngine.from_components(components, **kw)
    eng = StreamEngine.from_components(components, **kw)
    for e in (ref, eng):
        e.prepare(prompt="a city at night", negative_prompt="blur", guidance_scale=1.4, delta=0.8)
    assert accelerate(eng, "openvino", threads=threads, openvino_precision=precision) == "openvino"
    return ref, eng


def _settle(eng: StreamEngine) -> None:
    """Wait for the background compiles the last calls asked for."""
    assert eng.unet_call.fast.compiler.wait(120), "background compile did not finish"


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _compare(ref: StreamEngine, eng: StreamEngine, frames: list[np.ndarray]) -> int:
    worst = 0
    for f in frames:
        worst = max(worst, _levels(ref(f), eng(f)))
    return worst


# -- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_openvino_equals_pytorch_for_every_cfg_steps_and_frames(tiny_components, cfg: str, frames: int) -> None:  # noqa: ANN001
    ref, eng = _pair(tiny_components, frames=frames, cfg=cfg)
    pool = _frames(6, frames)
    try:
        for steps in (1, 2, 4):
            if steps != 1:
                for e in (ref, eng):
                    e.update(t_index_list=T_LISTS[steps])
                eng(pool[0])  # a new UNet row count: PyTorch serves it while it compiles
                ref(pool[0])
                _settle(eng)
            before = describe_seams(eng)["unet_call"]["fallback_calls"]
            worst = _compare(ref, eng, pool[1:4])
            assert worst <= FP32_LEVELS, f"T={steps}: {worst} levels apart"
            seams = describe_seams(eng)
            assert seams["unet_call"]["fallback_calls"] == before, "OpenVINO did not serve the compiled shape"
            assert all(v["backend"] == "openvino" and v["broken"] is None for v in seams.values())
    finally:
        restore(eng)


def test_openvino_parity_with_similarity_filter_brushes_and_live_updates(tiny_components) -> None:  # noqa: ANN001
    ref, eng = _pair(tiny_components, cfg="self")
    pool = _frames(4, seed=1)
    try:
        for e in (ref, eng):
            e.update(t_index_list=T_LISTS[2], similarity_threshold=0.9, similarity_max_skip=3)
        eng(pool[0]), ref(pool[0])
        _settle(eng)
        # Similarity filter: a held frame is skipped alike (same seed, same input decisions).
        still = [pool[1]] * 6
        assert _compare(ref, eng, still) <= FP32_LEVELS
        assert ref.stats["skipped"] == eng.stats["skipped"] > 0
        # Live updates: prompt (with a transition), guidance, delta, seed.
        for e in (ref, eng):
            e.update(prompt="a forest in fog", guidance_scale=1.8, delta=0.5, seed=11, similarity_threshold=0.0)
        assert _compare(ref, eng, pool) <= FP32_LEVELS
        # Brushes: two more UNet rows per stage; the new shape is compiled in the background.
        for e in (ref, eng):
            e.set_brush(0, prompt="flames", rect=(0.0, 0.0, 0.5, 0.5), mask_blur=2.0)
        eng(pool[0]), ref(pool[0])
        _settle(eng)
        before = describe_seams(eng)["unet_call"]["fallback_calls"]
        assert _compare(ref, eng, pool) <= FP32_LEVELS
        assert describe_seams(eng)["unet_call"]["fallback_calls"] == before
        # txt2img through the same seams.
        assert _levels(ref.txt2img(), eng.txt2img()) <= FP32_LEVELS
    finally:
        restore(eng)


def test_full_vae_runs_in_openvino_too(tiny_model_path) -> None:  # noqa: ANN001
    from streamnode.diffusion.models import load_components

    full = load_components("tiny", device="cpu", dtype="float32", use_tiny_vae=False, cpu_threads=1)
    ref, eng = _pair(full, cfg="self")
    try:
        for e in (ref, eng):
            e.update(t_index_list=T_LISTS[2])
        assert _compare(ref, eng, _frames(3)) <= FP32_LEVELS
        seams = describe_seams(eng)
        assert all(v["backend"] == "openvino" and v["broken"] is None for v in seams.values())
        assert seams["vae_encode"]["fallback_calls"] == seams["vae_decode"]["fallback_calls"] == 0
    finally:
        restore(eng)


@pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no AMX or AVX-512-BF16: bf16 cannot be measured here")
def test_bf16_stays_within_its_documented_levels(tiny_components) -> None:  # noqa: ANN001
    ref, eng = _pair(tiny_components, cfg="self", precision="auto")
    try:
        assert describe_seams(eng)["unet_call"]["precision"] == "bf16"
        pool = _frames(4)
        diffs = [np.abs(ref(f).astype(np.int16) - eng(f).astype(np.int16)) for f in pool]
        print("bf16 levels: max", max(int(d.max()) for d in diffs), "mean", float(np.mean([d.mean() for d in diffs])))
        assert float(np.mean([d.mean() for d in diffs])) <= 3.0
    finally:
        restore(eng)


# -- shapes during a show ----------------------------------------------------------------------


def test_a_new_shape_is_compiled_off_the_engine_thread(tiny_components, caplog) -> None:  # noqa: ANN001
    ref, eng = _pair(tiny_components, cfg="none")
    try:
        frame = _frames(1)[0]
        assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS  # warm: the next call is one UNet call
        with caplog.at_level(logging.INFO, logger="streamnode"):
            for e in (ref, eng):
                e.update(t_index_list=[20, 30, 40])
            # The first call with 3 rows does not wait for a compile: PyTorch takes it.
            assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS
            assert describe_seams(eng)["unet_call"]["fallback_calls"] == 1
            _settle(eng)
            assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS
        assert describe_seams(eng)["unet_call"]["fallback_calls"] == 1
        compiles = [r for r in caplog.records if "openvino: unet for 3x4x8x8" in r.getMessage()]
        assert len(compiles) == 1
        assert compiles[0].threadName == "openvino-compile" != threading.current_thread().name
    finally:
        restore(eng)


def test_start_without_waiting_serves_pytorch_until_compiled(tiny_components) -> None:  # noqa: ANN001
    """`wait=False` (a model switch while another engine serves): no compile before returning."""
    kw = dict(t_index_list=[30, 40], width=128, height=SIZE, cfg_type="self", seed=5)
    ref, eng = StreamEngine.from_components(tiny_components, **kw), StreamEngine.from_components(tiny_components, **kw)
    for e in (ref, eng):
        e.prepare(prompt="a harbour")
    try:
        assert accelerate(eng, "openvino", threads=1, wait=False) == "openvino"
        frame = np.zeros((SIZE, 128, 3), np.uint8)
        assert np.array_equal(ref(frame), eng(frame))  # PyTorch served every seam
        assert describe_seams(eng)["unet_call"]["fallback_calls"] >= 1
        _settle(eng)
        calls = {s: v["fallback_calls"] for s, v in describe_seams(eng).items()}
        assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS
        assert {s: v["fallback_calls"] for s, v in describe_seams(eng).items()} == calls
    finally:
        restore(eng)


# -- the cache ---------------------------------------------------------------------------------


def test_compiled_models_are_cached_and_a_corrupt_one_is_recompiled(tiny_components, tmp_path, caplog) -> None:  # noqa: ANN001
    from streamnode.accel.cache import EngineCache

    cache = EngineCache(tmp_path)
    kw = dict(t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="self", seed=3)
    eng = StreamEngine.from_components(tiny_components, **kw)
    eng.prepare(prompt="a test")
    assert accelerate(eng, "openvino", threads=1, cache=cache) == "openvino"
    entries = {e.key.component: e for e in cache.entries()}
    assert set(entries) == {"unet", "vae_encoder", "vae_decoder"}
    key = entries["unet"].key
    assert key.runtime == "openvino" and key.runtime_version == ov.__version__.split("-")[0]
    assert key.dtype in ("float32", "bfloat16") and key.device_name.startswith("CPU ")
    assert (key.profile.max_batch, key.profile.opt_height) == (eng.batch_rows, SIZE)
    restore(eng)

    # A second start imports every model (nothing compiled).
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "openvino", threads=1, cache=cache) == "openvino"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("loaded from the cache" in m for m in messages) == 3
    assert not any(" compiled in " in m for m in messages)
    restore(eng)

    # A blob OpenVINO refuses, with a sidecar that vouches for it: removed, recompiled, used.
    bad = b"not an OpenVINO blob" * 64
    entry = entries["unet"]
    entry.engine_path.write_bytes(bad)
    meta = json.loads(entry.sidecar_path.read_text())
    import hashlib

    meta.update(sha256=hashlib.sha256(bad).hexdigest(), size=len(bad))
    entry.sidecar_path.write_text(json.dumps(meta))
    # And a truncated decoder: its checksum no longer matches.
    dec = entries["vae_decoder"].engine_path
    dec.write_bytes(dec.read_bytes()[: dec.stat().st_size // 2])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "openvino", threads=1, cache=cache) == "openvino"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "OpenVINO refused it" in text and "truncated" in text
    assert text.count(" compiled in ") == 2
    ref = StreamEngine.from_components(tiny_components, **kw)
    ref.prepare(prompt="a test")
    frame = _frames(1)[0]
    assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS
    assert describe_seams(eng)["unet_call"]["fallback_calls"] == 0
    restore(eng)


def test_a_later_process_compiles_a_new_shape_from_the_kept_ir_without_converting(
    tiny_components, tmp_path, caplog, monkeypatch  # noqa: ANN001
) -> None:
    """A node started from the cache (or switched to a model another process built) compiles a
    shape first seen during the show from the converted model kept on disk: no tracing beside the
    serving engine. A damaged one is converted again."""
    from collections import OrderedDict

    import streamnode.accel.openvino as openvino_backend
    from streamnode.accel.cache import EngineCache

    conversions: list[str] = []
    real_convert = openvino_backend.convert

    def counting_convert(components, component, shapes):  # noqa: ANN001, ANN202
        conversions.append(component)
        return real_convert(components, component, shapes)

    monkeypatch.setattr(openvino_backend, "convert", counting_convert)
    monkeypatch.setattr(openvino_backend, "_CONVERTED", OrderedDict())  # this process has converted nothing
    cache = EngineCache(tmp_path)
    kw = dict(t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="none", seed=3)
    ref, eng = StreamEngine.from_components(tiny_components, **kw), StreamEngine.from_components(tiny_components, **kw)
    for e in (ref, eng):
        e.prepare(prompt="a lighthouse")
    assert accelerate(eng, "openvino", threads=1, cache=cache) == "openvino"
    restore(eng)
    assert sorted(conversions) == ["unet", "vae_decoder", "vae_encoder"]
    kept = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "openvino-ir").glob("*/ir.json"))
    assert kept == ["unet", "vae_decoder", "vae_encoder"]

    def later_process_with_rows(rows: list[int]) -> None:
        monkeypatch.setattr(openvino_backend, "_CONVERTED", OrderedDict())
        assert accelerate(eng, "openvino", threads=1, cache=cache) == "openvino"  # every shape imported
        try:
            for e in (ref, eng):
                e.update(t_index_list=rows)
            frame = _frames(1)[0]
            assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS  # PyTorch served it; compiling in the background
            _settle(eng)
            served_by_pytorch = describe_seams(eng)["unet_call"]["fallback_calls"]
            assert _levels(ref(frame), eng(frame)) <= FP32_LEVELS
            assert describe_seams(eng)["unet_call"]["fallback_calls"] == served_by_pytorch  # OpenVINO took it
        finally:
            restore(eng)

    conversions.clear()
    later_process_with_rows([20, 30, 40])
    assert conversions == []

    unet = next((tmp_path / "openvino-ir").glob("unet-*"))
    weights = unet / "model.bin"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    with caplog.at_level(logging.WARNING, logger="streamnode.accel"):
        later_process_with_rows([10, 20, 30, 40])
    assert conversions == ["unet"]
    assert "model.bin fails its checksum" in caplog.text and "converting it again" in caplog.text


# -- choosing and falling back -------------------------------------------------------------------


def test_auto_picks_openvino_on_a_cpu_and_says_so(tiny_components, caplog) -> None:  # noqa: ANN001
    eng = StreamEngine.from_components(tiny_components, t_index_list=[35], width=SIZE, height=SIZE, cfg_type="none")
    eng.prepare(prompt="x")
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "auto", threads=1) == "openvino"
    (line,) = [r for r in caplog.records if r.getMessage().startswith("acceleration:")]
    assert line.levelno == logging.INFO
    assert "openvino (OpenVINO" in line.getMessage() and "on CPU" in line.getMessage()
    assert ("bf16" if _cpu_has_bf16() else "f32") in line.getMessage()
    restore(eng)
    assert not isinstance(eng.unet_call, GuardedCall)


def test_auto_without_openvino_is_eager_with_the_install_line(tiny_components, caplog, monkeypatch) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    monkeypatch.setattr(accel, "openvino_installed", lambda: False)
    eng = StreamEngine.from_components(tiny_components, t_index_list=[35], width=SIZE, height=SIZE, cfg_type="none")
    eng.prepare(prompt="x")
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "auto") == "eager"
    (line,) = [r for r in caplog.records if r.getMessage().startswith("acceleration:")]
    assert line.levelno == logging.INFO and 'pip install "streamnode[openvino]"' in line.getMessage()
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "openvino") == "eager"
    warning = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warning) == 1 and "OpenVINO is not installed" in warning[0].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"openvino_device": "NPU"}, "OpenVINO sees no NPU here"),
        ({"openvino_precision": "bf16"}, "no AMX or AVX-512-BF16"),
    ],
)
def test_openvino_that_cannot_run_falls_back_with_one_line(tiny_components, caplog, kwargs, expect) -> None:  # noqa: ANN001
    if "openvino_device" in kwargs and "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    if "openvino_precision" in kwargs and _cpu_has_bf16():
        pytest.skip("this CPU has bf16")
    eng = StreamEngine.from_components(tiny_components, t_index_list=[35], width=SIZE, height=SIZE, cfg_type="none")
    eng.prepare(prompt="x")
    with caplog.at_level(logging.INFO, logger="streamnode.accel"):
        assert accelerate(eng, "openvino", **kwargs) == "eager"
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "using eager, because openvino:" in warning.getMessage() and expect in warning.getMessage()
    assert eng(_frames(1)[0]).shape == (SIZE, SIZE, 3)


def test_sizes_openvino_cannot_take_are_refused_up_front(tiny_components, caplog) -> None:  # noqa: ANN001
    eng = StreamEngine.from_components(tiny_components, t_index_list=[35], width=72, height=SIZE, cfg_type="none")
    eng.prepare(prompt="x")
    with caplog.at_level(logging.WARNING, logger="streamnode.accel"):
        assert accelerate(eng, "openvino") == "eager"
    assert "72x64 is not a multiple of 64" in caplog.records[0].getMessage()


def test_chain_for_openvino_and_auto() -> None:
    assert backend_chain("openvino", cuda=False, tensorrt_importable=False) == ["openvino", "eager"]
    assert backend_chain("auto", cuda=False, tensorrt_importable=False, openvino_importable=True) == ["openvino", "eager"]
    assert backend_chain("auto", cuda=True, tensorrt_importable=True, openvino_importable=True)[0] == "tensorrt"


def test_doctor_row_names_version_devices_and_precision() -> None:
    rows = {name: (ok, detail) for name, ok, detail in accel.describe_backends()}
    ok, detail = rows["openvino"]
    assert ok and "OpenVINO" in detail and "CPU" in detail
    assert ("bf16" if _cpu_has_bf16() else "f32 (this CPU has no AMX or AVX-512-BF16)") in detail


def test_converting_sends_no_telemetry(tiny_components, monkeypatch) -> None:  # noqa: ANN001
    """OpenVINO's converter reports to Google Analytics unless the user opted out; a node never
    reaches the network on its own (and the sender held a process's exit for 36 s offline)."""
    telemetry = pytest.importorskip("openvino_telemetry.utils.sender", reason="this OpenVINO has no telemetry")
    sent: list[object] = []
    monkeypatch.setattr(telemetry.TelemetrySender, "send", lambda self, backend, message: sent.append(message))
    from streamnode.accel.openvino import convert

    assert convert(tiny_components, "vae_decoder", ((1, 4, 8, 8),)) is not None
    assert sent == []
