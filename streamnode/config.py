"""Typed node configuration, validated once at the edge; TOML presets and `--set` overrides.

Everything inside the node trusts a `NodeConfig`: its values were checked here, with errors
that name the key, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamnode.live_params import (
    MAX_BRUSHES,
    MAX_CONTROLNETS,
    MAX_CUES,
    MAX_LFOS,
    MAX_LORAS,
    QUANTIZE_MODES,
    BrushParams,
    ControlNetParams,
    CueParams,
    LfoParams,
    LiveParams,
    LoraParams,
    explain,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

class ConfigError(ValueError):
    """A bad preset, `--set` or flag. The message is one line per problem, naming the fix."""


class _Section(BaseModel):
    # NaN/inf fail before range checks with "finite number": an OSC fader sending nan must not pass.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


OPENVINO_DEVICES = ("CPU", "GPU", "NPU")
"""OpenVINO's device names, spelled its way (GPU.1 for a second GPU): `model.device` takes them."""


def is_openvino_device(device: str) -> bool:
    """True for OpenVINO device names (CPU, GPU, GPU.1, NPU); PyTorch's are lower case."""
    kind, _, index = device.partition(".")
    return kind in OPENVINO_DEVICES and (not index or index.isdigit())


class ModelConfig(_Section):
    id: str = Field("tiny", description="hub id, local diffusers folder, .safetensors file, or 'tiny'")
    lcm_lora: str | None = Field(None, description="LCM-LoRA to fuse (hub id, folder or .safetensors)")
    lora_mode: Literal["runtime", "merged"] = Field(
        "runtime",
        description="how the [[loras]] stack applies: runtime (adapters; a weight change shows on the next "
        "frame, a cost every frame) or merged (into the weights; no cost per frame, a weight change "
        "re-merges off the engine thread); docs/lora.md",
    )
    use_tiny_vae: bool = Field(True, description="TAESD-class VAE instead of the full VAE")
    tiny_vae: str | None = Field(None, description="TAESD weights; default: the model's own or madebyollin/taesd")
    device: str = Field(
        "auto",
        description="auto, cpu, cuda, cuda:N, mps; or an OpenVINO device (CPU, GPU, GPU.N, NPU) with accel openvino",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    accel: Literal["auto", "eager", "compile", "tensorrt", "openvino"] = "auto"
    openvino_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="OpenVINO precision; auto: bf16 on CPUs with AMX or AVX-512-BF16, else fp32; fp16 on GPU/NPU"
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=256,
        description="threads for the model on a CPU (torch, and OpenVINO's pool); default in the node: half the cores",
    )
    allow_build: bool = Field(
        False,
        description="build missing TensorRT engines at start (off: a show never stalls on a build; "
        "run `streamnode build-engines` first)",
    )
    engine_min_size: int = Field(
        256, ge=64, le=4096, description="smallest width/height a TensorRT engine accepts (multiple of 64)"
    )
    engine_max_size: int = Field(
        1024, ge=64, le=4096, description="largest width/height a TensorRT engine accepts (multiple of 64)"
    )
    engine_max_batch: int | None = Field(
        None,
        ge=1,
        le=256,
        description="UNet rows per call a TensorRT engine accepts; default 2·steps·frame_buffer_size, "
        "which covers every cfg mode at the preset's steps or fewer",
    )
    engine_controlnet: bool = Field(
        False,
        description="build the TensorRT UNet with ControlNet residual inputs (one engine serves 0..N nets); "
        "without it, frames with a ControlNet run the UNet in PyTorch",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok and not is_openvino_device(v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps, or an OpenVINO device: CPU, GPU, GPU.N, NPU")
        return v

    @field_validator("engine_min_size", "engine_max_size")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        # The SD UNet halves the latent three times: TensorRT engines need pixels divisible by 64.
        if v % 64:
            raise ValueError(f"must be a multiple of 64 (e.g. {max(64, v - v % 64)} or {v - v % 64 + 64})")
        return v

    @model_validator(mode="after")
    def _openvino_device(self) -> ModelConfig:
        if is_openvino_device(self.device) and self.accel not in ("auto", "openvino"):
            raise ValueError(
                f"device {self.device} is an OpenVINO device: use accel openvino (--accel openvino), "
                "or a PyTorch device (cpu, cuda, mps)"
            )
        return self

    @model_validator(mode="after")
    def _engine_range(self) -> ModelConfig:
        if self.engine_min_size > self.engine_max_size:
            raise ValueError(
                f"engine_min_size {self.engine_min_size} is above engine_max_size {self.engine_max_size}"
            )
        return self


class StreamConfig(LiveParams):
    """What the stream engine is built with (fixed while it runs) plus the live parameters it
    starts with (live_params.LiveParams: prompt, guidance, t_index_list, seed, …)."""

    mode: Literal["img2img", "txt2img"] = "img2img"
    width: int = Field(512, ge=64, le=2048, description="output width, multiple of 8")
    height: int = Field(512, ge=64, le=2048, description="output height, multiple of 8")
    frame_buffer_size: int = Field(1, ge=1, le=8)
    cfg_type: Literal["none", "full", "self", "initialize"] = "self"

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (e.g. {v - v % 8} or {v - v % 8 + 8})")
        return v

    @property
    def live(self) -> LiveParams:
        """The live parameters this config starts the engine with."""
        return LiveParams.model_validate(self.model_dump(include=set(LiveParams.model_fields)))


class SourceConfig(_Section):
    uri: str = Field("test://moving", description="test://, file://, webcam://, ndi://, spout://, shm://")
    fps: float = Field(30.0, gt=0.0, le=1000.0, description="pace of test:// and file:// sources")
    fit: Literal["cover", "contain", "stretch"] = "cover"
    loop: bool = Field(True, description="file:// sources start again at the end (False: --once)")
    lost_timeout_s: float = Field(5.0, ge=0.0, description="after this long without frames, show black")
    hold_after_s: float = Field(
        0.5, gt=0.0, le=60.0, description="without frames this long, repeat the last frame at `fps` until it returns"
    )
    ndi_discovery: list[str] = Field(default_factory=list, description="extra NDI discovery addresses")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("must be a URI such as test://moving, file://clip.mp4, ndi://Name, shm://name")
        return v

    @field_validator("ndi_discovery", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


class OscConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(7000, ge=0, le=65535, description="0 picks a free port")
    reply: str | None = Field(None, description="host:port for replies; default: sender host, port 7001")
    reply_port: int = Field(7001, ge=1, le=65535)
    prefix: str = Field("", description="address prefix such as /vj1")
    allow: list[str] = Field(default_factory=list, description="CIDR networks allowed to send")
    oscquery_port: int | None = Field(None, ge=0, le=65535, description="TCP port for OSCQuery: HTTP and websocket (needs streamnode[oscquery])")
    oscquery_mdns: bool = Field(False, description="announce OSCQuery over mDNS/Bonjour where the node listens (needs zeroconf)")
    allow_model_switch: bool = False

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # OSC 1.0 keeps these characters out of address names (they are pattern syntax), and
        # OSCQuery clients build a tree from the path: no empty steps either.
        if v and (not v.startswith("/") or v.endswith("/") or "//" in v or set(v) & set(" #*,?[]{}")):
            raise ValueError("must look like /vj1: a leading slash, no trailing slash, none of the characters "
                             "space # * , ? [ ] { }")
        return v

    @field_validator("reply")
    @classmethod
    def _reply(cls, v: str | None) -> str | None:
        if v is not None:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port, e.g. 127.0.0.1:7001")
        return v

    @field_validator("allow", mode="before")
    @classmethod
    def _allow(cls, v: Any) -> Any:
        items = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as e:
                raise ValueError(f"{item!r} is not a network such as 192.168.1.0/24") from e
        return items

    @model_validator(mode="after")
    def _open_needs_allow(self) -> OscConfig:
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        if self.enabled and not loopback and not self.allow:
            raise ValueError(
                f"osc.host={self.host} listens beyond this machine: give an allow-list, "
                "e.g. --osc-allow 192.168.1.0/24"
            )
        return self


class BrushConfig(BrushParams):
    """One `[[brushes]]` entry of a preset: a brush's live fields (live_params.BrushParams)."""


class LoraConfig(LoraParams):
    """One `[[loras]]` entry of a preset: a LoRA's live fields (live_params.LoraParams)."""


class ControlNetConfig(ControlNetParams):
    """One `[[controlnets]]` entry of a preset: a ControlNet's live fields (live_params.ControlNetParams)."""


class LfoConfig(LfoParams):
    """One `[[lfos]]` entry of a preset: an LFO's live fields (live_params.LfoParams)."""


class CueConfig(CueParams):
    """One `[[cues]]` entry of a preset: a cue (live_params.CueParams)."""


class TempoConfig(_Section):
    """The clock and what follows it (docs/tempo.md)."""

    source: Literal["internal", "link", "midi"] = Field(
        "internal", description="internal: a free-running BPM; link: Ableton Link; midi: MIDI clock in (midi_clock_port)"
    )
    bpm: float = Field(120.0, ge=20.0, le=999.0, description="the tempo to start with (internal, link)")
    beats_per_bar: int = Field(4, ge=1, le=16)
    quantize: Literal[QUANTIZE_MODES] = Field("off", description="hold every change until the next beat/bar/N bars")  # type: ignore[valid-type]
    lookahead_ms: float = Field(
        0.0, ge=-1000.0, le=1000.0,
        description="added to the engine's measured latency when releasing a quantized change (a projector's delay)",
    )
    cue_every: int = Field(0, ge=0, le=64, description="step the cue list every N bars (0: on /cue_next only)")
    midi_clock_port: str | None = Field(None, min_length=1, description="MIDI input to follow (source = midi)")

    @model_validator(mode="after")
    def _midi_port(self) -> TempoConfig:
        if self.source == "midi" and not self.midi_clock_port:
            raise ValueError("tempo.source = midi needs tempo.midi_clock_port (a MIDI input name)")
        return self


class MidiConfig(_Section):
    """MIDI control surface in (docs/tempo.md): CC and notes mapped to live parameters."""

    port: str | None = Field(None, min_length=1, description="MIDI input to read (a name or part of one); none: off")
    mapping: str | None = Field(
        None, min_length=1, description="mapping file (JSON); default: midi-map.json in the user config folder"
    )


class ArtNetChannel(_Section):
    """One DMX channel (or an 8+8-bit pair) driving one live parameter."""

    channel: int = Field(ge=1, le=512, description="DMX channel (1..512), counted from the universe's start")
    address: str = Field(min_length=2, max_length=64, description="the live parameter's OSC address, e.g. /guidance")
    bits: Literal[8, 16] = Field(8, description="16: this channel is the coarse byte, the next the fine")
    low: float | None = Field(None, description="the value at DMX 0 (default: the parameter's minimum)")
    high: float | None = Field(None, description="the value at full (default: the parameter's maximum)")


class ArtNetConfig(_Section):
    """Art-Net (DMX over UDP) in: a lighting desk drives live parameters."""

    enabled: bool = False
    host: str = Field("0.0.0.0", description="interface to listen on (Art-Net is broadcast on port 6454)")
    port: int = Field(6454, ge=0, le=65535)
    universe: int = Field(0, ge=0, le=32767, description="port-address (net, sub-net, universe) to listen to")
    start_channel: int = Field(1, ge=1, le=512, description="channel 1 of the mapping is this DMX channel")
    channels: list[ArtNetChannel] = Field(default_factory=list)


class RuntimeConfig(_Section):
    no_drop: bool = Field(False, description="process every frame in order (offline renders)")
    duration: float | None = Field(None, gt=0.0, description="stop after this many seconds")
    max_frames: int | None = Field(None, gt=0, description="stop after this many output frames")
    ring_slots: int = Field(4, ge=2, le=64)
    metrics_interval_s: float = Field(5.0, gt=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: a line per record; json: one JSON object per line (for log collectors)"
    )
    log_file: str | None = Field(
        None, min_length=1, description="also write the log to this file, rotated by size (FILE, FILE.1, …)"
    )
    log_file_max_mb: float = Field(10.0, gt=0.0, le=1e6, description="rotate the log file when it reaches this size")
    log_file_backups: int = Field(3, ge=0, le=100, description="rotated log files kept (FILE.1 … FILE.N)")
    max_brushes: int = Field(8, ge=0, le=MAX_BRUSHES)
    max_loras: int = Field(8, ge=0, le=MAX_LORAS, description="LoRA indices /lora/0 .. /lora/(max_loras−1)")
    max_controlnets: int = Field(
        4, ge=0, le=MAX_CONTROLNETS, description="ControlNet indices /controlnet/0 .. /controlnet/(max_controlnets−1)"
    )
    max_lfos: int = Field(8, ge=0, le=MAX_LFOS, description="LFO indices /lfo/0 .. /lfo/(max_lfos−1)")
    max_cues: int = Field(16, ge=0, le=MAX_CUES, description="cue indices /cues/0 .. /cues/(max_cues−1)")
    engine: Literal["stream", "passthrough"] = Field(
        "stream", description="stream: the diffusion engine; passthrough: input resized to the output (tests, benchmarks)"
    )


class NodeConfig(_Section):
    description: str = ""
    model: ModelConfig = ModelConfig()
    stream: StreamConfig = StreamConfig()
    source: SourceConfig = SourceConfig()
    sinks: list[str] = Field(default_factory=lambda: ["null://"], min_length=1)
    osc: OscConfig = OscConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    brushes: list[BrushConfig] = Field(default_factory=list)
    loras: list[LoraConfig] = Field(default_factory=list)
    controlnets: list[ControlNetConfig] = Field(default_factory=list)
    tempo: TempoConfig = TempoConfig()
    lfos: list[LfoConfig] = Field(default_factory=list)
    cues: list[CueConfig] = Field(default_factory=list)
    midi: MidiConfig = MidiConfig()
    artnet: ArtNetConfig = ArtNetConfig()

    @field_validator("sinks")
    @classmethod
    def _sinks(cls, v: list[str]) -> list[str]:
        for uri in v:
            if "://" not in uri:
                raise ValueError(f"{uri!r} must be a URI such as null://, file://out.mp4, shm://name")
        return v

    @model_validator(mode="after")
    def _brush_count(self) -> NodeConfig:
        if len(self.brushes) > self.runtime.max_brushes:
            raise ValueError(f"{len(self.brushes)} brushes given, runtime.max_brushes is {self.runtime.max_brushes}")
        if len(self.loras) > self.runtime.max_loras:
            raise ValueError(f"{len(self.loras)} LoRAs given, runtime.max_loras is {self.runtime.max_loras}")
        if len(self.controlnets) > self.runtime.max_controlnets:
            raise ValueError(
                f"{len(self.controlnets)} ControlNets given, runtime.max_controlnets is {self.runtime.max_controlnets}"
            )
        if len(self.lfos) > self.runtime.max_lfos:
            raise ValueError(f"{len(self.lfos)} LFOs given, runtime.max_lfos is {self.runtime.max_lfos}")
        if len(self.cues) > self.runtime.max_cues:
            raise ValueError(f"{len(self.cues)} cues given, runtime.max_cues is {self.runtime.max_cues}")
        return self


# -- presets -------------------------------------------------------------------------------


def preset_dirs() -> list[Path]:
    """Where `--preset NAME` looks: the user's folder first, then the shipped presets."""
    dirs = []
    if env := os.environ.get("STREAMNODE_PRESETS"):
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(user_preset_dir())
    dirs.append(shipped_preset_dir())
    return dirs


def shipped_preset_dir() -> Path:
    """`presets/` beside the package in a checkout; the `streamnode.presets` data package in a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "presets"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("streamnode.presets")))


def user_preset_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "streamnode" / "presets"


def cache_dir() -> Path:
    """The user cache: the tiny model, TensorRT engines. `STREAMNODE_CACHE` overrides it."""
    if env := os.environ.get("STREAMNODE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streamnode"


def is_preset_name(name: str) -> bool:
    """Preset names are bare file stems: no paths, no dots, nothing that could escape a folder."""
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_" for c in name)


def find_preset(name: str) -> Path:
    if not is_preset_name(name):
        raise ConfigError(f"preset {name!r}: a preset is a name such as 'demo' (letters, digits, - and _)")
    for d in preset_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return path
    raise ConfigError(f"preset {name!r} not found; `streamnode presets` lists: {', '.join(list_presets())}")


def list_presets() -> dict[str, str]:
    """Preset name → its one-line description; a user preset shadows a shipped one."""
    found: dict[str, str] = {}
    for d in reversed(preset_dirs()):
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            try:
                desc = str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))
            except (OSError, tomllib.TOMLDecodeError) as e:
                desc = f"(unreadable: {e})"
            found[path.stem] = desc
    return dict(sorted(found.items()))


def read_preset(name: str) -> dict[str, Any]:
    path = find_preset(name)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {path}: not valid TOML: {e}") from e


# -- overrides -----------------------------------------------------------------------------


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`stream.guidance_scale=1.4` → (["stream", "guidance_scale"], 1.4).

    The value is read as a TOML value (numbers, booleans, lists, quoted strings); anything
    that is not valid TOML is taken as a plain string, and the schema decides if that is ok.
    """
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: write KEY=VALUE, e.g. --set stream.guidance_scale=1.4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The config field an error is about: its location without the item index inside a list
    (stream.t_index_list.0 → stream.t_index_list; brushes.0.prompt stays)."""
    path = list(loc)
    while path and isinstance(path[-1], int):
        path.pop()
    return tuple(path)


def _describe(err: dict[str, Any], data: dict[str, Any]) -> str:
    path = _field_path(err["loc"])
    key = ".".join(str(p) for p in path) or "(top level)"
    value: Any = data
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in path[:-1])
        model = NodeConfig
        for part in path[:-1]:
            field = model.model_fields.get(part)
            ann = getattr(field, "annotation", None)
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if model is None:
                break
        allowed = ", ".join(model.model_fields) if model else "see `streamnode run --help`"
        return f"config: unknown key {key!r}; keys allowed in {section or 'the top level'}: {allowed}"
    return f"config: {key} = {value!r} is not valid: {explain(err, NodeConfig)}"


def build_config(data: dict[str, Any]) -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as e:
        # One line per field: pydantic's follow-up complaints about the same field are dropped.
        lines: dict[tuple[Any, ...], str] = {}
        for err in e.errors():
            lines.setdefault(_field_path(err["loc"]), _describe(err, data))
        raise ConfigError("\n".join(lines.values())) from None


def load_config(
    preset: str | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    preset_file: str | os.PathLike[str] | None = None,
) -> NodeConfig:
    """Preset (by name or file) → dotted `overrides` from short flags → `--set` lines → validate."""
    data: dict[str, Any] = {}
    if preset_file is not None:
        try:
            data = tomllib.loads(Path(preset_file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {preset_file}: {e}") from None
    elif preset is not None:
        data = read_preset(preset)
    for key, value in (overrides or {}).items():
        _merge(data, key.split("."), value)
    for assignment in sets or []:
        path, value = parse_set(assignment)
        _merge(data, path, value)
    return build_config(data)
