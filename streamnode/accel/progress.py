"""Build progress events and a console renderer with time estimates."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

DEFAULT_BUILD_SECONDS = {"unet": 360.0, "vae_encoder": 60.0, "vae_decoder": 120.0}
"""First-build guesses (SD-class UNet, TAESD/full VAE on a current GPU); replaced by measured times."""


@dataclass(frozen=True)
class BuildProgress:
    """One step of getting an engine ready.

    `stage` is one of: "cached" (a valid engine was found), "export" (ONNX export), "build"
    (TensorRT optimisation; `fraction` may be set), "load", "done", "failed".
    """

    component: str
    index: int
    total: int
    stage: str
    elapsed_s: float
    fraction: float | None = None
    estimate_s: float | None = None
    message: str = ""

    @property
    def remaining_s(self) -> float | None:
        """Best guess of the seconds left for this component's build."""
        guesses = []
        if self.fraction is not None and self.fraction > 0.05:
            guesses.append(self.elapsed_s / self.fraction - self.elapsed_s)
        if self.estimate_s is not None:
            guesses.append(max(self.estimate_s - self.elapsed_s, 0.0))
        return min(guesses) if guesses else None


ProgressCallback = Callable[[BuildProgress], None]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ConsoleProgress:
    """Renders `BuildProgress` as one updating line per component (a plain line per event off a TTY)."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # A log file gets a line every 15 s, a terminal a redraw twice a second.
        self.min_interval_s = min_interval_s if min_interval_s is not None else (0.5 if self.tty else 15.0)
        self._last = 0.0
        self._open_line = False

    def __call__(self, p: BuildProgress) -> None:
        head = f"[{p.index}/{p.total}] {p.component}"
        final = p.stage in ("cached", "done", "failed")
        if p.stage == "build":
            parts = [f"{head}: building TensorRT engine", f"{_clock(p.elapsed_s)} elapsed"]
            if p.fraction is not None:
                parts.insert(1, f"{p.fraction:4.0%}")
            if (left := p.remaining_s) is not None:
                parts.append(f"~{_clock(left)} left")
            line = ", ".join(parts)
        else:
            line = f"{head}: {p.message or p.stage}"
        now = time.monotonic()
        if not final and p.stage == "build" and now - self._last < self.min_interval_s:
            return
        self._last = now
        if self.tty and p.stage == "build":
            self.stream.write("\r\x1b[2K" + line)
            self._open_line = True
        else:
            if self._open_line:
                self.stream.write("\r\x1b[2K")
                self._open_line = False
            self.stream.write(line + "\n")
        self.stream.flush()
