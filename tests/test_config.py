"""Config: presets load, overrides apply, every bad value fails with the key, the value and the fix."""

from __future__ import annotations

import pytest

from streamnode.config import (
    ConfigError,
    NodeConfig,
    is_preset_name,
    list_presets,
    load_config,
    parse_set,
)

SHIPPED = {"demo", "sd-turbo", "lcm-sd15", "txt2img-turbo", "sdxl-turbo", "sdxl-turbo-lora"}


def test_shipped_presets_load_and_describe_themselves() -> None:
    presets = list_presets()
    assert set(presets) >= SHIPPED
    for name in SHIPPED:
        assert presets[name], f"{name} has no description"
        assert isinstance(load_config(preset=name), NodeConfig)


def test_preset_values() -> None:
    demo = load_config(preset="demo")
    assert demo.model.id == "tiny"
    assert demo.source.uri.startswith("test://")
    assert demo.sinks[0].startswith("file://")
    turbo = load_config(preset="sd-turbo")
    assert (turbo.stream.width, turbo.stream.height, len(turbo.stream.t_index_list)) == (512, 512, 1)
    assert turbo.model.use_tiny_vae
    lcm = load_config(preset="lcm-sd15")
    assert lcm.model.lcm_lora and lcm.stream.cfg_type == "self" and 2 <= len(lcm.stream.t_index_list) <= 4
    assert load_config(preset="txt2img-turbo").stream.mode == "txt2img"
    xl = load_config(preset="sdxl-turbo")
    assert xl.model.id == "stabilityai/sdxl-turbo" and xl.stream.cfg_type == "none" and xl.model.use_tiny_vae
    styled = load_config(preset="sdxl-turbo-lora")
    assert styled.model.lora_mode in ("runtime", "merged") and styled.loras and styled.loras[0].source


def test_set_overrides_and_short_flag_overrides() -> None:
    cfg = load_config(
        preset="demo",
        overrides={"stream.prompt": "a cat", "source.uri": "test://bars"},
        sets=["stream.guidance_scale=1.4", "stream.t_index_list=[20, 40]", "runtime.no_drop=false"],
    )
    assert cfg.stream.guidance_scale == 1.4
    assert cfg.stream.t_index_list == (20, 40)
    assert cfg.stream.prompt == "a cat"
    assert cfg.source.uri == "test://bars"
    assert cfg.runtime.no_drop is False


def test_set_after_flags_wins() -> None:
    cfg = load_config(overrides={"stream.seed": 5}, sets=["stream.seed=7"])
    assert cfg.stream.seed == 7


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("stream.guidance_scale=banana", ["stream.guidance_scale", "banana", "number"]),
        ("stream.guidance_scale=nan", ["stream.guidance_scale", "finite"]),
        ("stream.guidance_scale=99", ["stream.guidance_scale", "99", "0..20"]),
        ("stream.cfg_type=double", ["stream.cfg_type", "double", "none, full, self, initialize"]),
        ("stream.width=500", ["stream.width", "500", "multiple of 8", "496 or 504"]),
        ("stream.t_index_list=[45, 32]", ["stream.t_index_list", "strictly increasing"]),
        ("stream.t_index_list=[50]", ["stream.t_index_list", "0..49"]),
        ("stream.seed=-1", ["stream.seed", "-1"]),
        ("stream.guidanc=1", ["unknown key", "stream.guidanc", "guidance_scale"]),
        ("osc.prefix=vj1", ["osc.prefix", "leading slash"]),
        ("osc.prefix=/vj#1", ["osc.prefix", "/vj#1", "none of the characters"]),
        ("osc.prefix=/a//b", ["osc.prefix", "/a//b", "/vj1"]),
        ("osc.reply=localhost", ["osc.reply", "host:port"]),
        ("osc.allow=[\"not-a-net\"]", ["osc.allow", "192.168.1.0/24"]),
        ("model.device=gpu", ["model.device", "cuda"]),
        ("source.uri=clip.mp4", ["source.uri", "file://"]),
    ],
)
def test_every_invalid_value_names_key_value_and_fix(assignment: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="demo", sets=[assignment])
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


def test_open_osc_host_needs_allow_list() -> None:
    with pytest.raises(ConfigError, match="--osc-allow"):
        load_config(sets=["osc.host=0.0.0.0"])
    cfg = load_config(sets=["osc.host=0.0.0.0", "osc.allow=192.168.1.0/24"])
    assert cfg.osc.allow == ["192.168.1.0/24"]


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(sets=["stream.width=7", "stream.delta=-1"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and any("width" in x for x in lines) and any("delta" in x for x in lines)


@pytest.mark.parametrize("bad", ["a", "stream.guidance_scale", "=1", "stream..x=1", "1stream=2"])
def test_malformed_set_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(bad)


def test_set_value_types() -> None:
    assert parse_set("a.b=1")[1] == 1
    assert parse_set("a.b=1.5")[1] == 1.5
    assert parse_set("a.b=true")[1] is True
    assert parse_set("a.b=[1, 2]")[1] == [1, 2]
    assert parse_set('a.b="x y"')[1] == "x y"
    assert parse_set("a.b=a cat on a mat")[1] == "a cat on a mat"


@pytest.mark.parametrize("name", ["../demo", "/etc/passwd", "demo.toml", "", "a/b", "..", "x" * 100])
def test_preset_names_cannot_escape(name: str) -> None:
    assert not is_preset_name(name)
    with pytest.raises(ConfigError):
        load_config(preset=name)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="demo"):
        load_config(preset="nope")


def test_user_preset_dir_shadows_and_extends(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STREAMNODE_PRESETS", str(tmp_path))
    (tmp_path / "mine.toml").write_text('description = "my show"\n[stream]\nprompt = "fire"\n')
    (tmp_path / "broken.toml").write_text("[stream\n")
    assert list_presets()["mine"] == "my show"
    assert load_config(preset="mine").stream.prompt == "fire"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(preset="broken")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type varies by version
        cfg.stream.prompt = "x"  # type: ignore[misc]


def test_openvino_devices_are_spelled_the_openvino_way() -> None:
    from streamnode.diffusion.models import resolve_device

    for device in ("CPU", "GPU", "GPU.1", "NPU"):
        model = load_config(sets=["model.accel=openvino", f"model.device={device}"]).model
        assert model.device == device
        assert resolve_device(device).type == "cpu"  # the PyTorch copy (and fallback) stays on the CPU
    assert load_config(sets=["model.device=GPU"]).model.accel == "auto"
    with pytest.raises(ConfigError, match="OpenVINO device: use accel openvino"):
        load_config(sets=["model.accel=eager", "model.device=NPU"])
    with pytest.raises(ConfigError, match="CPU, GPU, GPU.N, NPU"):
        load_config(sets=["model.device=gpu.x"])
    with pytest.raises(ConfigError, match="openvino_precision"):
        load_config(sets=["model.openvino_precision=int4"])
