"""On-disk cache of compiled engines (TensorRT plans, OpenVINO compiled models): keys, layout, validation.

Layout, under `cache_dir()/engines/`:

    <component>-<digest16>/engine.plan    the serialized engine (a TensorRT plan or an exported
                                          OpenVINO compiled model)
    <component>-<digest16>/engine.json    sidecar: the full key, sha256 and size of engine.plan
    build_times.json                      measured build seconds, for the next build's estimate
    timing-<trt>-<gpu>.cache              TensorRT tactic timing cache (makes rebuilds faster)

An engine is loaded only when its sidecar's key matches the one asked for in every identity
field (model, LoRA, VAE, dtype, runtime and its version, device, format) *and* its profile
covers the shapes asked for (for OpenVINO, whose compiled models are static, *equals* them),
*and* the file's sha256 matches the sidecar. Anything else is rejected with
the reason logged and rebuilt; nothing is ever loaded on a partial match. Files are written to a
temporary name and renamed, the sidecar last, so a crash mid-write leaves no entry a later
run would trust.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from streamnode.accel.profile import EngineProfile

logger = logging.getLogger(__name__)

ENGINE_FORMAT_VERSION = 1
"""Bump when the ONNX export, I/O names or build settings change: every cached engine is rebuilt."""

COMPONENTS = ("unet", "vae_encoder", "vae_decoder")
SEAM_COMPONENTS = {"unet_call": "unet", "vae_encode": "vae_encoder", "vae_decode": "vae_decoder"}
"""The engine seam each cached component serves."""
CONTROL_UNET = "unet_control"
"""The UNet with ControlNet residual inputs (accel/controlnet_export.py), built instead of `unet`
with `model.engine_controlnet`."""
RUNTIMES = ("tensorrt", "openvino")

T = TypeVar("T")


class EngineCacheError(RuntimeError):
    """A cached engine could not be used and none could be built; the message says what to do."""


class EngineLoadError(RuntimeError):
    """A cached engine file exists but cannot be deserialized (corrupt, or from another build)."""


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes an engine valid for a model on a machine.

    `weights` is a fingerprint of the exact module being exported (so a fused LoRA or a swapped
    VAE changes it even when `model` does not); `model` is the loader's identity (model id,
    weight-file fingerprint or hub revision, LoRA, VAE kind). `dtype` is the precision the
    engine computes in. `runtime` is "tensorrt" or "openvino"; `device_name` the GPU's name or
    the OpenVINO device and its full name; `device_detail` the compute capability (TensorRT) or
    what the device offers that changes the compiled code (OpenVINO: its optimisation
    capabilities and thread count).
    """

    component: str
    model: str
    weights: str
    lora: str
    vae_kind: str
    profile: EngineProfile
    dtype: str
    runtime_version: str
    device_name: str
    device_detail: str
    format_version: int = ENGINE_FORMAT_VERSION
    runtime: str = "tensorrt"

    def __post_init__(self) -> None:
        if self.component not in (*COMPONENTS, CONTROL_UNET):
            raise ValueError(f"component {self.component!r} is not one of {', '.join((*COMPONENTS, CONTROL_UNET))}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")

    @property
    def static(self) -> bool:
        """OpenVINO models are compiled for one exact shape: only an equal profile can serve."""
        return self.runtime == "openvino"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = self.profile.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"key lacks {', '.join(sorted(missing))}")
        values = {k: data[k] for k in names}
        values["profile"] = EngineProfile.from_dict(data["profile"])
        return cls(**values)

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """Every field but the profile: these must match exactly for an engine to be usable."""
        data = self.to_dict()
        del data["profile"]
        return data

    def mismatch(self, other: EngineKey) -> str | None:
        """Why an engine built for `other` cannot serve this key; None when it can."""
        mine, theirs = self.identity(), other.identity()
        diffs = [f"{k}: {theirs[k]!r} ≠ {mine[k]!r}" for k in sorted(mine) if mine[k] != theirs[k]]
        if diffs:
            return "built for a different " + "; ".join(diffs)
        if self.static and other.profile != self.profile:
            return f"compiled for {other.profile.to_dict()}, not {self.profile.to_dict()}"
        if not other.profile.covers(self.profile):
            return f"its profile {other.profile.to_dict()} does not cover {self.profile.to_dict()}"
        return None

    def with_profile(self, profile: EngineProfile) -> EngineKey:
        return replace(self, profile=profile)


@dataclass(frozen=True)
class CacheEntry:
    directory: Path
    key: EngineKey

    @property
    def engine_path(self) -> Path:
        return self.directory / "engine.plan"

    @property
    def sidecar_path(self) -> Path:
        return self.directory / "engine.json"


def weights_fingerprint(module: Any, samples: int = 64) -> str:
    """Bit-exact fingerprint of a module's parameters and buffers: names, shapes, dtypes and
    `samples` evenly spaced values of each tensor.

    Exact gathers, not sums: a GPU reduction can differ in its last bit between runs, which would
    make the key (and a rebuild) random. A fused LoRA or a swapped VAE changes sampled values.
    """
    import torch

    digest = hashlib.sha256()
    picks = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            # float64: float32 cannot hold index 29491199 (an SD UNet's 2560→1280 3×3 conv) and
            # rounds it past the end.
            idx = torch.linspace(
                0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device, dtype=torch.float64
            ).long()
            picks.append(flat[idx].float())
    if picks:
        digest.update(torch.cat(picks).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def identity_part(identity: str, prefix: str) -> str:
    """The `prefix…` part of a loader identity such as "model@abc|lora=x|taesd=y"."""
    return next((p[len(prefix):] for p in identity.split("|") if p.startswith(prefix)), "")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """Engines on disk, found by key; see the module docstring for the layout and the rules."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            from streamnode.config import cache_dir

            root = cache_dir() / "engines"
        self.root = Path(root)

    # -- layout ------------------------------------------------------------------------------

    def entry_for(self, key: EngineKey) -> CacheEntry:
        return CacheEntry(self.root / f"{key.component}-{key.digest()[:16]}", key)

    def timing_cache_path(self, key: EngineKey) -> Path:
        gpu = "".join(c if c.isalnum() else "_" for c in key.device_name)[:40]
        return self.root / f"timing-trt{key.runtime_version}-{gpu}-sm{key.device_detail}.cache"

    def entries(self, component: str | None = None) -> list[CacheEntry]:
        """Every entry with a readable sidecar (a damaged one is skipped here, rejected in `find`)."""
        found = []
        pattern = f"{component}-*" if component else "*-*"
        for sidecar in sorted(self.root.glob(f"{pattern}/engine.json")) if self.root.is_dir() else []:
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
                found.append(CacheEntry(sidecar.parent, EngineKey.from_dict(meta["key"])))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.debug("engine cache: skipping %s (%s)", sidecar.parent, e)
        return found

    # -- lookup ------------------------------------------------------------------------------

    def validate(self, entry: CacheEntry, want: EngineKey) -> str | None:
        """None when `entry` may serve `want`; otherwise the reason it may not."""
        try:
            meta = json.loads(entry.sidecar_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no sidecar (an interrupted build?)"
        except (OSError, ValueError) as e:
            return f"unreadable sidecar ({e})"
        try:
            stored = EngineKey.from_dict(meta["key"])
            recorded_sha, recorded_size = str(meta["sha256"]), int(meta["size"])
        except (KeyError, TypeError, ValueError) as e:
            return f"malformed sidecar ({e})"
        if (why := want.mismatch(stored)) is not None:
            return why
        if not entry.engine_path.is_file():
            return "engine file missing"
        size = entry.engine_path.stat().st_size
        if size != recorded_size:
            return f"engine file is {size} bytes, the sidecar says {recorded_size} (truncated or replaced)"
        if sha256_file(entry.engine_path) != recorded_sha:
            return "engine file checksum differs from its sidecar (corrupt or replaced)"
        return None

    def find(self, want: EngineKey) -> CacheEntry | None:
        """The best valid engine for `want`: its own entry first, else one whose profile covers it.

        An entry at `want`'s own place that fails validation is removed (it will be rebuilt).
        """
        own = self.entry_for(want)
        if own.directory.exists():
            why = self.validate(own, want)
            if why is None:
                return CacheEntry(own.directory, self._stored_key(own) or want)
            logger.warning("engine cache: rejecting %s: %s; it will be rebuilt", own.directory.name, why)
            self.remove(own)
        candidates = []
        for entry in self.entries(want.component):
            if entry.directory == own.directory or want.mismatch(entry.key) is not None:
                continue
            why = self.validate(entry, want)
            if why is None:
                candidates.append(entry)
            else:
                logger.info("engine cache: not using %s: %s", entry.directory.name, why)
        if not candidates:
            return None

        # The tightest engine that covers the need is the fastest: smallest activation memory.
        def area(e: CacheEntry) -> tuple[int, int]:
            p = e.key.profile
            return (p.max_batch * p.max_size * p.max_size, -(p.opt_batch == want.profile.opt_batch))

        return min(candidates, key=area)

    def _stored_key(self, entry: CacheEntry) -> EngineKey | None:
        try:
            return EngineKey.from_dict(json.loads(entry.sidecar_path.read_text(encoding="utf-8"))["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- writing -----------------------------------------------------------------------------

    def store(self, key: EngineKey, engine_bytes: bytes, *, build_seconds: float | None = None) -> CacheEntry:
        """Write an engine and then its sidecar (the sidecar's presence marks a complete entry)."""
        entry = self.entry_for(key)
        entry.directory.mkdir(parents=True, exist_ok=True)
        entry.sidecar_path.unlink(missing_ok=True)
        _write_atomic(entry.engine_path, engine_bytes)
        meta = {
            "key": key.to_dict(),
            "sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "size": len(engine_bytes),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": build_seconds,
        }
        _write_atomic(entry.sidecar_path, json.dumps(meta, indent=2).encode())
        if build_seconds is not None:
            self.record_build_time(key, build_seconds)
        return entry

    def remove(self, entry: CacheEntry) -> None:
        shutil.rmtree(entry.directory, ignore_errors=True)

    # -- build-time estimates ----------------------------------------------------------------

    def _times_path(self) -> Path:
        return self.root / "build_times.json"

    def record_build_time(self, key: EngineKey, seconds: float) -> None:
        path = self._times_path()
        try:
            times = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            times = {}
        times[f"{key.device_name}|{key.component}"] = round(float(seconds), 1)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(times, indent=2, sort_keys=True).encode())
        except OSError as e:  # an estimate is a nicety; never fail a build over it
            logger.debug("could not record build time: %s", e)

    def estimate_seconds(self, key: EngineKey) -> float | None:
        """The last measured build time of this component on this GPU, if any."""
        try:
            times = json.loads(self._times_path().read_text(encoding="utf-8"))
            return float(times[f"{key.device_name}|{key.component}"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


class BuildAbandoned(RuntimeError):
    """Raised by a fill (`misses_filled_by`) whose load is no longer wanted: nothing is built here either."""


_FILL: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("streamnode_cache_fill", default=None)


@contextlib.contextmanager
def misses_filled_by(fill: Callable[[], None]) -> Iterator[None]:
    """On this thread, an engine missing from the cache is first asked of `fill` (which builds
    the engine's models into the cache somewhere else: node/prebuild.py, another process) and
    looked up again; only what `fill` did not leave, or when it raised, is built here.
    `fill` may be called once per miss: it runs its build once and remembers the outcome."""
    token = _FILL.set(fill)
    try:
        yield
    finally:
        _FILL.reset(token)


def _fill_and_find(cache: EngineCache, key: EngineKey) -> CacheEntry | None:
    fill = _FILL.get()
    if fill is None:
        return None
    try:
        fill()
    except BuildAbandoned:
        raise
    except Exception as e:  # noqa: BLE001 - the engine is built here instead, as without a fill
        logger.warning("engine cache: %s was not built elsewhere (%s); building it here", key.component, e)
        return None
    entry = cache.find(key)
    if entry is None:
        logger.warning("engine cache: the build elsewhere left no %s for this key; building it here", key.component)
    return entry


def obtain_engine(
    cache: EngineCache,
    key: EngineKey,
    *,
    build: Callable[[], bytes],
    load: Callable[[CacheEntry], T],
    allow_build: bool = True,
    force: bool = False,
) -> tuple[T, CacheEntry, bool]:
    """Load the cached engine for `key`, or build, store and load one. Returns (engine, entry, built).

    A cached file that fails to deserialize is removed and rebuilt once; a freshly built one
    that fails is an error (rebuilding again would loop). Under `misses_filled_by`, a missing
    engine is first left to be built elsewhere (built is then False: this process loaded it).
    """
    if not force:
        entry = cache.find(key)
        if entry is not None:
            try:
                return load(entry), entry, False
            except EngineLoadError as e:
                logger.warning("engine cache: %s cannot be loaded (%s); it will be rebuilt", entry.directory.name, e)
                cache.remove(entry)
    if not allow_build:
        raise EngineCacheError(f"no usable {key.component} engine in {cache.root} and building is off")
    if not force and (entry := _fill_and_find(cache, key)) is not None:
        return load(entry), entry, False
    start = time.perf_counter()
    data = build()
    entry = cache.store(key, data, build_seconds=time.perf_counter() - start)
    return load(entry), entry, True
