"""Converted OpenVINO models (IR files) kept beside the engine cache.

The engine cache (cache.py) holds compiled models, one per exact shape. A shape first seen
later (steps changed live, a brush added, a preset with other steps) must be compiled from the
converted model, and converting (TorchScript tracing and OpenVINO's PyTorch frontend) is Python
that holds the interpreter for up to ~200 ms at a time: on a node started from the cache, or
after a model switch whose models another process built (node/prebuild.py), the first new
shape converted the whole UNet in the node, beside the serving engine. Kept as IR, the
converted model is read back by OpenVINO's C++ reader in milliseconds for the tiny model.

One folder per (model identity, component, weights fingerprint, OpenVINO version): `model.xml`,
`model.bin` and `ir.json` (the key and the files' SHA-256), written to a temporary folder and
renamed into place, so a reader never sees half a model. A folder whose files fail their
checksum, or that OpenVINO refuses, is removed and the model converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from streamnode.accel.cache import sha256_file

logger = logging.getLogger(__name__)

IR_FORMAT_VERSION = 1
"""Bumped when what is stored changes meaning: older folders are then never matched."""
FOLDER = "openvino-ir"
"""The IR folders' parent, inside the engine cache's root."""
_FILES = ("model.xml", "model.bin")


class IrStore:
    """Converted models under `cache_root`/openvino-ir, by key (`read`, `write`)."""

    def __init__(self, cache_root: Path) -> None:
        self.root = Path(cache_root) / FOLDER

    @staticmethod
    def key(model: str, component: str, weights: str, openvino_version: str) -> dict[str, Any]:
        return {"model": model, "component": component, "weights": weights,
                "openvino": openvino_version, "format_version": IR_FORMAT_VERSION}

    def folder(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{key['component']}-{digest}"

    def read(self, key: dict[str, Any]) -> Any | None:
        """The stored model for `key`, or None (not stored, or stored damaged: then removed)."""
        folder = self.folder(key)
        sidecar = folder / "ir.json"
        if not sidecar.is_file():
            return None
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get("key") != key:
                raise ValueError("its key differs")
            for name in _FILES:
                if sha256_file(folder / name) != meta["sha256"][name]:
                    raise ValueError(f"{name} fails its checksum")
            import openvino as ov

            return ov.Core().read_model(str(folder / "model.xml"), str(folder / "model.bin"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            logger.warning("openvino: the stored %s model in %s is unusable (%s); converting it again",
                           key["component"], folder, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def write(self, key: dict[str, Any], model: Any) -> None:
        """Store `model` under `key`. A failure (disk full, read-only cache) costs a warning: the
        model was converted, only the next process will convert it again."""
        import openvino as ov

        folder = self.folder(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                # Uncompressed: what is read back must compile to exactly what the conversion would.
                ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
                meta = {"key": key, "sha256": {name: sha256_file(tmp / name) for name in _FILES}}
                (tmp / "ir.json").write_text(json.dumps(meta, indent=1))
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, RuntimeError) as e:
            logger.warning("openvino: could not keep the converted %s model in %s (%s)", key["component"], self.root, e)
