"""TensorRT and CUDA-graph checks that need an NVIDIA GPU (skipped elsewhere, with the reason).

Run on a GPU box with the tensorrt extra installed: `pytest -m gpu tests/test_accel_gpu.py`.
The tiny model keeps the builds to seconds; the profile is 64..256 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch)"),
]

MIN, MAX = 64, 256
FP16_RTOL = 2e-2
"""fp16 TensorRT vs fp16 PyTorch: max |Δ| within 2 % of the output's largest magnitude."""


def _need_tensorrt() -> None:
    from streamnode.accel.tensorrt import tensorrt_status

    ok, detail = tensorrt_status()
    if not ok:
        pytest.skip(detail)


@pytest.fixture(scope="module")
def gpu_components(tiny_model_path):  # noqa: ANN001, ANN201
    from streamnode.diffusion.models import load_components

    return load_components("tiny", device="cuda", dtype="float16")


@pytest.fixture
def cache(tmp_path):  # noqa: ANN001, ANN201
    from streamnode.accel.cache import EngineCache

    return EngineCache(tmp_path / "engines")


def _engine(components, size: tuple[int, int] = (128, 128), **kw):  # noqa: ANN001, ANN202
    from streamnode.diffusion.stream import StreamEngine

    kw.setdefault("t_index_list", [32, 45])
    kw.setdefault("cfg_type", "self")
    eng = StreamEngine.from_components(components, width=size[0], height=size[1], seed=5, **kw)
    eng.prepare(prompt="a gpu test")
    return eng


def _frames(size: tuple[int, int], n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-3)


def test_engines_build_and_match_pytorch(gpu_components, cache) -> None:  # noqa: ANN001
    _need_tensorrt()
    from streamnode.accel.onnx_export import component_module, sample_inputs
    from streamnode.accel.profile import profile_for
    from streamnode.accel.tensorrt import ensure_engines

    profile = profile_for(steps=2, frames=1, width=128, height=128, min_size=MIN, max_size=MAX)
    ready = ensure_engines(gpu_components, profile, cache=cache)
    assert all(r.built for r in ready.values())
    for component, item in ready.items():
        module = component_module(gpu_components, component)
        for batch, h, w in [(1, 128, 128), (profile.vae_max_batch if component != "unet" else 4, 256, 64)]:
            inputs = sample_inputs(gpu_components, component, batch=batch, height=h, width=w, seed=batch)
            with torch.inference_mode():
                ref = module(*inputs)
                for _ in range(3):  # plain, captured, replayed
                    got = item.runner(*inputs)
            err = _rel(got, ref)
            print(f"{component} B={batch} {w}x{h}: relative max error {err:.2e}")
            assert got.shape == ref.shape and err < FP16_RTOL
        item.runner.close()


def test_resolution_steps_and_cfg_change_without_rebuild(gpu_components, cache) -> None:  # noqa: ANN001
    _need_tensorrt()
    from streamnode.accel import accelerate, describe_seams, restore

    eng = _engine(gpu_components, (128, 128))
    assert accelerate(eng, "tensorrt", cache=cache, min_size=MIN, max_size=MAX) == "tensorrt"
    built = {e.directory for e in cache.entries()}
    assert len(built) == 3
    ref = _engine(gpu_components, (128, 128))
    for frame in _frames((128, 128)):
        a, b = eng(frame), ref(frame)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0

    # Steps and cfg mode change at run time: same engine, no PyTorch fallback.
    eng.update(t_index_list=[40])
    for frame in _frames((128, 128), 2):
        eng(frame)
    assert all(v["fallback_calls"] == 0 and not v["broken"] for v in describe_seams(eng).values())

    # Another resolution and cfg mode at start: the cached engines serve it, nothing is built.
    other = _engine(gpu_components, (192, 128), cfg_type="full")
    assert accelerate(other, "tensorrt", cache=cache, min_size=MIN, max_size=MAX, allow_build=False) == "tensorrt"
    assert {e.directory for e in cache.entries()} == built
    other_ref = _engine(gpu_components, (192, 128), cfg_type="full")
    for frame in _frames((192, 128)):
        a, b = other(frame), other_ref(frame)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0
    assert all(v["fallback_calls"] == 0 for v in describe_seams(other).values())
    restore(eng)
    restore(other)


def test_shape_outside_the_profile_runs_in_pytorch(gpu_components, cache) -> None:  # noqa: ANN001
    _need_tensorrt()
    from streamnode.accel import accelerate, describe_seams, restore

    eng = _engine(gpu_components, (128, 128), t_index_list=[40], cfg_type="none")
    assert accelerate(eng, "tensorrt", cache=cache, min_size=MIN, max_size=MAX, max_batch=1) == "tensorrt"
    eng.update(t_index_list=[30, 40, 45])  # 3 rows > max_batch 1: must not crash
    for frame in _frames((128, 128), 2):
        assert eng(frame).shape == (128, 128, 3)
    assert describe_seams(eng)["unet_call"]["fallback_calls"] > 0
    restore(eng)


def test_corrupt_engine_is_rebuilt_on_the_gpu(gpu_components, cache) -> None:  # noqa: ANN001
    _need_tensorrt()
    import tensorrt as trt

    from streamnode.accel.profile import profile_for
    from streamnode.accel.tensorrt import ensure_engines, gpu_identity, make_key

    profile = profile_for(steps=1, frames=1, width=128, height=128, min_size=MIN, max_size=MAX)
    name, cc = gpu_identity(gpu_components.device)
    key = make_key(gpu_components, "vae_decoder", profile, trt_version=trt.__version__, gpu_name=name,
                   compute_capability=cc)
    cache.store(key, b"not a TensorRT plan, but the sidecar checksum matches")
    ready = ensure_engines(gpu_components, profile, cache=cache, which=("vae_decoder",))
    assert ready["vae_decoder"].built
    ready["vae_decoder"].runner.close()


def test_compile_with_cuda_graphs_matches_eager(gpu_components) -> None:  # noqa: ANN001
    from streamnode.accel import accelerate, describe_seams, restore

    eng = _engine(gpu_components, (128, 128))
    if accelerate(eng, "compile") != "compile":
        pytest.skip("torch.compile is not usable here (see the warning)")
    ref = _engine(gpu_components, (128, 128))
    for frame in _frames((128, 128)):
        assert np.abs(eng(frame).astype(int) - ref(frame).astype(int)).mean() < 2.0
    info = describe_seams(eng)
    print("compile seconds:", {k: v.get("compile_seconds") for k, v in info.items()})
    assert all(v["fallback_calls"] == 0 for v in info.values())
    restore(eng)
