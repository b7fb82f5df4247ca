"""Backend choice, fallbacks and guards, on the CPU with the real StreamEngine and the tiny model."""

from __future__ import annotations

import argparse
import io
import logging
import os

import numpy as np
import pytest
import torch

import streamnode.accel as accel
from streamnode.accel import BackendFailed, GuardedCall, accelerate, backend_chain, describe_backends, restore
from streamnode.accel.progress import BuildProgress, ConsoleProgress
from streamnode.diffusion.stream import StreamEngine

SIZE = 64


@pytest.fixture
def engine(tiny_components):  # noqa: ANN001, ANN201
    eng = StreamEngine.from_components(
        tiny_components, t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="self", seed=3
    )
    eng.prepare(prompt="a test")
    yield eng
    restore(eng)


def _frames(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def _accel_warnings(caplog) -> list[logging.LogRecord]:  # noqa: ANN001
    return [r for r in caplog.records if r.name.startswith("streamnode.accel") and r.levelno >= logging.WARNING]


# -- choosing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "cuda", "trt", "chain"),
    [
        ("auto", False, False, ["eager"]),
        ("auto", True, False, ["compile", "eager"]),
        ("auto", True, True, ["tensorrt", "compile", "eager"]),
        ("eager", True, True, ["eager"]),
        ("compile", False, False, ["compile", "eager"]),
        ("tensorrt", True, False, ["tensorrt", "compile", "eager"]),
        ("tensorrt", False, False, ["tensorrt", "eager"]),
        ("openvino", False, False, ["openvino", "eager"]),
    ],
)
def test_backend_chain(mode: str, cuda: bool, trt: bool, chain: list[str]) -> None:
    assert backend_chain(mode, cuda=cuda, tensorrt_importable=trt) == chain


@pytest.mark.parametrize(("cuda", "chain"), [(False, ["openvino", "eager"]), (True, ["compile", "eager"])])
def test_auto_uses_openvino_only_without_cuda(cuda: bool, chain: list[str]) -> None:
    assert backend_chain("auto", cuda=cuda, tensorrt_importable=False, openvino_importable=True) == chain


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, eager, compile, tensorrt"):
        backend_chain("onnx", cuda=False, tensorrt_importable=False)


def test_describe_backends_on_this_machine() -> None:
    rows = {name: (ok, detail) for name, ok, detail in describe_backends()}
    assert list(rows) == ["eager", "compile", "tensorrt", "openvino"]
    assert rows["eager"][0] is True
    if not torch.cuda.is_available():
        ok, detail = rows["tensorrt"]
        assert not ok and 'pip install "streamnode[tensorrt]"' in detail


# -- fallbacks -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-TensorRT path of a CPU machine")
def test_tensorrt_missing_falls_back_with_one_clear_line(engine, caplog) -> None:  # noqa: ANN001
    before = {s: getattr(engine, s) for s in accel.SEAMS}
    with caplog.at_level(logging.INFO):
        used = accelerate(engine, "tensorrt")
    assert used == "eager"
    warnings = _accel_warnings(caplog)
    assert len(warnings) == 1
    assert "using eager" in warnings[0].getMessage()
    assert 'pip install "streamnode[tensorrt]"' in warnings[0].getMessage()
    assert {s: getattr(engine, s) for s in accel.SEAMS} == before
    assert engine(_frames(1)[0]).shape == (SIZE, SIZE, 3)


def test_auto_on_cpu_without_openvino_is_eager_without_a_warning(engine, caplog, monkeypatch) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    monkeypatch.setattr(accel, "openvino_installed", lambda: False)
    with caplog.at_level(logging.INFO):
        assert accelerate(engine, "auto") == "eager"
    assert not _accel_warnings(caplog)


def test_failed_tensorrt_build_falls_to_compile_with_one_message(engine, caplog, monkeypatch) -> None:  # noqa: ANN001
    def trt_oom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise BackendFailed("the TensorRT build ran out of GPU memory (…); close other GPU programs")

    def fake_compile(_engine, originals, _opts):  # noqa: ANN001, ANN202 - real compile is tested below
        return {s: GuardedCall(s, "compile", originals[s], originals[s]) for s in accel.SEAMS}

    monkeypatch.setitem(accel._BACKENDS, "tensorrt", trt_oom)
    monkeypatch.setitem(accel._BACKENDS, "compile", fake_compile)
    monkeypatch.setattr(accel, "backend_chain", lambda *a, **k: ["tensorrt", "compile", "eager"])
    with caplog.at_level(logging.INFO):
        used = accelerate(engine, "tensorrt")
    assert used == "compile"
    warnings = _accel_warnings(caplog)
    assert len(warnings) == 1 and "using compile" in warnings[0].getMessage()
    assert "ran out of GPU memory" in warnings[0].getMessage()
    assert isinstance(engine.unet_call, GuardedCall) and engine.unet_call.backend == "compile"


@pytest.mark.parametrize(
    ("raised", "expect"),
    [("oom", "ran out of GPU memory"), ("missing", "streamnode build-engines"), ("parse", "could not build")],
)
def test_tensorrt_setup_errors_become_one_line_reasons(engine, monkeypatch, raised: str, expect: str) -> None:  # noqa: ANN001
    """The real `_use_tensorrt` error handling, with TensorRT itself stubbed out."""
    import streamnode.accel.tensorrt as trt_mod
    from streamnode.accel.cache import EngineCacheError

    def fail(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        if raised == "oom":
            raise trt_mod.EngineBuildError("Requested amount of GPU memory could not be allocated", oom=True)
        if raised == "missing":
            raise EngineCacheError("no usable unet engine")
        raise trt_mod.EngineBuildError("TensorRT could not build the unet engine: unsupported op")

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_mod, "ensure_engines", fail)
    opts = {"allow_build": raised != "missing", "min_size": 64, "max_size": 1024, "max_batch": None}
    with pytest.raises(BackendFailed, match=expect):
        accel._use_tensorrt(engine, accel._originals(engine), opts)


def test_stream_outside_the_engine_range_is_refused_up_front(engine, monkeypatch) -> None:  # noqa: ANN001
    import streamnode.accel.tensorrt as trt_mod

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    opts = {"allow_build": True, "min_size": 256, "max_size": 1024, "max_batch": None}
    with pytest.raises(BackendFailed, match="outside the engine range 256..1024"):
        accel._use_tensorrt(engine, accel._originals(engine), opts)


def test_compile_failure_falls_back_to_eager(engine, caplog, monkeypatch) -> None:  # noqa: ANN001
    import streamnode.accel.compile as compile_mod

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        def fn(*_args):  # noqa: ANN002, ANN202
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return dict.fromkeys(accel.SEAMS, fn)

    monkeypatch.setattr(compile_mod, "compile_seams", broken)
    with caplog.at_level(logging.INFO):
        assert accelerate(engine, "compile") == "eager"
    (warning,) = _accel_warnings(caplog)
    assert "torch.compile failed" in warning.getMessage() and "C++ compiler" in warning.getMessage()


# -- compile plumbing (fast: torch.compile's "eager" backend) --------------------------------


def test_compile_path_gives_the_same_frames(tiny_components, engine) -> None:  # noqa: ANN001
    reference = StreamEngine.from_components(
        tiny_components, t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="self", seed=3
    )
    reference.prepare(prompt="a test")
    assert accelerate(engine, "compile", compile_backend="eager") == "compile"
    for frame in _frames(3):
        a, b = engine(frame), reference(frame)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    info = accel.describe_seams(engine)
    assert {v["backend"] for v in info.values()} == {"compile"}
    assert all(v["fallback_calls"] == 0 for v in info.values())
    assert all("compile_seconds" in v for v in info.values())
    restore(engine)  # the shared weights go back to the layout they were loaded in
    assert all(p.is_contiguous() for p in tiny_components.unet.parameters())


def test_accelerate_twice_wraps_the_pytorch_seams_not_the_previous_backend(engine, monkeypatch) -> None:  # noqa: ANN001
    def fake_compile(_engine, originals, _opts):  # noqa: ANN001, ANN202
        return {s: GuardedCall(s, "compile", originals[s], originals[s]) for s in accel.SEAMS}

    monkeypatch.setitem(accel._BACKENDS, "compile", fake_compile)
    accelerate(engine, "compile")
    first = engine.unet_call.fallback
    accelerate(engine, "compile")
    assert engine.unet_call.fallback is first
    restore(engine)
    assert not isinstance(engine.unet_call, GuardedCall)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("STREAMNODE_RUN_SLOW"),
    reason="inductor compiles the tiny UNet in ~45-90 s on 2 cores; set STREAMNODE_RUN_SLOW=1",
)
def test_inductor_compile_on_cpu(tiny_components, engine) -> None:  # noqa: ANN001
    reference = StreamEngine.from_components(
        tiny_components, t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="self", seed=3
    )
    reference.prepare(prompt="a test")
    assert accelerate(engine, "compile") == "compile"
    info = accel.describe_seams(engine)
    print("compile seconds:", {k: v.get("compile_seconds") for k, v in info.items()})
    assert info["unet_call"]["compile_seconds"] > 0
    for frame in _frames(2):
        assert np.abs(engine(frame).astype(int) - reference(frame).astype(int)).max() <= 2


# -- the guard -------------------------------------------------------------------------------


def test_guard_sends_unacceptable_calls_to_pytorch_and_logs_once(caplog) -> None:  # noqa: ANN001
    fast_calls = []
    guard = GuardedCall(
        "unet_call", "tensorrt",
        fast=lambda x: fast_calls.append(x) or "fast",
        fallback=lambda x: "eager",
        accepts=lambda x: None if x < 10 else "batch 12 is outside the engine's 1..8",
    )
    with caplog.at_level(logging.WARNING):
        assert guard(1) == "fast"
        assert guard(12) == "eager"
        assert guard(12) == "eager"
        assert guard(2) == "fast"
    assert len(caplog.records) == 1 and "outside the engine" in caplog.records[0].getMessage()
    assert guard.fallback_calls == 2 and guard.broken is None


def test_guard_switches_to_pytorch_for_good_after_a_fault(caplog) -> None:  # noqa: ANN001
    def fast(_x: int) -> str:
        raise RuntimeError("TensorRT unet enqueue failed: illegal memory access")

    guard = GuardedCall("unet_call", "tensorrt", fast=fast, fallback=lambda x: "eager")
    with caplog.at_level(logging.WARNING):
        assert [guard(i) for i in range(3)] == ["eager"] * 3
    assert len(caplog.records) == 1 and "enqueue failed" in caplog.records[0].getMessage()
    assert guard.broken and guard.fallback_calls == 3


# -- the CLI command ---------------------------------------------------------------------------


def _cli_args(*argv: str) -> argparse.Namespace:
    from streamnode.accel.build import add_build_engines_arguments

    parser = argparse.ArgumentParser()
    add_build_engines_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-TensorRT exit of a CPU machine")
def test_build_engines_without_tensorrt_exits_with_the_install_line(capsys) -> None:  # noqa: ANN001
    from streamnode.accel.build import EXIT_UNAVAILABLE, build_engines_command

    code = build_engines_command(_cli_args("--preset", "sd-turbo", "--max-size", "768"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_UNAVAILABLE != 0
    assert len(err) == 1 and 'pip install "streamnode[tensorrt]"' in err[0]


def test_build_engines_bad_config_exits_2(capsys) -> None:  # noqa: ANN001
    from streamnode.accel.build import EXIT_USAGE, build_engines_command

    assert build_engines_command(_cli_args("--preset", "sd-turbo", "--max-size", "1000")) == EXIT_USAGE
    assert "multiple of 64" in capsys.readouterr().err
    assert build_engines_command(_cli_args("--preset", "no-such-preset")) == EXIT_USAGE


def test_progress_lines_show_fraction_and_time_left() -> None:
    out = io.StringIO()
    show = ConsoleProgress(out, min_interval_s=0.0)
    show(BuildProgress("unet", 1, 3, "export", 1.0, message="exporting ONNX…"))
    show(BuildProgress("unet", 1, 3, "build", 60.0, fraction=0.5, estimate_s=300.0))
    show(BuildProgress("unet", 1, 3, "done", 130.0, message="built in 2.2 min"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] unet: exporting ONNX…"
    assert "50%" in lines[1] and "1:00 elapsed" in lines[1] and "~1:00 left" in lines[1]
    assert lines[2] == "[1/3] unet: built in 2.2 min"


def test_accelerate_with_config_passes_the_model_section(engine, monkeypatch) -> None:  # noqa: ANN001
    from streamnode.config import load_config
    from streamnode.diffusion.models import node_cpu_threads

    seen = {}
    monkeypatch.setattr(accel, "accelerate", lambda eng, mode, **kw: seen.update(mode=mode, **kw) or "eager")
    model = load_config(sets=["model.accel=tensorrt", "model.allow_build=false", "model.engine_max_size=768"]).model
    assert accel.accelerate_with_config(engine, model) == "eager"
    assert seen == {"mode": "tensorrt", "allow_build": False, "progress": None, "min_size": 256,
                    "max_size": 768, "max_batch": None, "openvino_device": None, "openvino_precision": "auto",
                    "threads": node_cpu_threads(), "controlnet_inputs": False}
    model = load_config(sets=["model.accel=openvino", "model.device=GPU.1", "model.openvino_precision=fp16",
                              "model.cpu_threads=3"]).model
    accel.accelerate_with_config(engine, model)
    assert (seen["mode"], seen["openvino_device"], seen["openvino_precision"], seen["threads"]) == (
        "openvino", "GPU.1", "fp16", 3)


# -- the TensorRT wiring after a build, with stand-in runners (the real ones need a GPU) --------


def _fake_trt(monkeypatch, tmp_path, engine, *, wrong: str | None = None):  # noqa: ANN001, ANN202
    """Stub TensorRT out of `_use_tensorrt`: `ensure_engines` returns PyTorch-backed 'runners'."""
    import streamnode.accel.tensorrt as trt_mod
    from streamnode.accel.cache import EngineCache, EngineKey
    from streamnode.accel.onnx_export import component_module

    cache = EngineCache(tmp_path)

    def fake_ensure(components, profile, **_kw):  # noqa: ANN001, ANN003, ANN202
        ready = {}
        for component in ("unet", "vae_encoder", "vae_decoder"):
            key = EngineKey(component, components.identity, "w", "", "taesd", profile, "float32", "10.13", "GPU", "9.0")
            entry = cache.store(key, b"plan")
            module = component_module(components, component)

            def run(*args, _m=module, _c=component):  # noqa: ANN002, ANN202
                out = _m(*args)
                return out + 5.0 if _c == wrong else out

            ready[component] = trt_mod.ReadyEngine(component, run, entry, True, 0.0)
        return ready

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_mod, "ensure_engines", fake_ensure)
    return cache


def test_tensorrt_wiring_self_check_and_profile_guard(engine, tiny_components, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    _fake_trt(monkeypatch, tmp_path, engine)
    assert accelerate(engine, "tensorrt", min_size=64, max_size=256, max_batch=2) == "tensorrt"
    reference = StreamEngine.from_components(
        tiny_components, t_index_list=[32, 45], width=SIZE, height=SIZE, cfg_type="self", seed=3
    )
    reference.prepare(prompt="a test")
    for frame in _frames(2):
        assert np.array_equal(engine(frame), reference(frame))
    assert accel.describe_seams(engine)["unet_call"]["fallback_calls"] == 0
    engine.update(t_index_list=[20, 32, 45])  # 3 UNet rows > max_batch 2: PyTorch takes those calls
    engine(_frames(1)[0])
    assert accel.describe_seams(engine)["unet_call"]["fallback_calls"] > 0


def test_engine_failing_its_self_check_is_dropped_and_not_used(engine, monkeypatch, tmp_path, caplog) -> None:  # noqa: ANN001
    cache = _fake_trt(monkeypatch, tmp_path, engine, wrong="vae_decoder")
    with caplog.at_level(logging.WARNING):
        assert accelerate(engine, "tensorrt", min_size=64, max_size=256) == "eager"
    (warning,) = _accel_warnings(caplog)
    assert "vae_decode engine disagrees with PyTorch" in warning.getMessage()
    assert [e.key.component for e in cache.entries()] == ["unet", "vae_encoder"]
