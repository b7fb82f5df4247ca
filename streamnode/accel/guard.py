"""A seam replacement that can never take a show down: fast path, PyTorch path behind it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class GuardedCall:
    """Calls `fast`, or `fallback` (the engine's original PyTorch seam) when `fast` cannot serve.

    - `accepts(*args)` returns None when `fast` can take these inputs, else the reason (e.g. a
      batch outside the engine profile after a cfg change); that call goes to `fallback` and the
      reason is logged once.
    - If `fast` raises, the error is logged once and every later call goes to `fallback`: a
      frame is never lost to an accelerator fault, only slowed.
    - A UNet call with ControlNet residuals (`control=`) goes to `fallback` unless `fast` says
      it takes them (a `takes_control` attribute that is true): a graph built without residual
      inputs cannot add them.
    """

    def __init__(
        self,
        name: str,
        backend: str,
        fast: Callable[..., Any],
        fallback: Callable[..., Any],
        accepts: Callable[..., str | None] | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.fast = fast
        self.fallback = fallback
        self.accepts = accepts
        self.broken: str | None = None
        self.fallback_calls = 0
        self._reasons_logged: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # kwargs: a seam's keyword-only extras (the UNet's `added_cond`, `control`), passed to both paths.
        if self.broken is None and (self.accepts is not None or kwargs.get("control") is not None):
            why = self._refuses(*args, **kwargs)
            if why is not None:
                if why not in self._reasons_logged:
                    self._reasons_logged.add(why)
                    logger.warning("%s: %s cannot take this call (%s); running it in PyTorch", self.name, self.backend, why)
                self.fallback_calls += 1
                return self.fallback(*args, **kwargs)
        if self.broken is None:
            try:
                return self.fast(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any accelerator fault must degrade, not crash
                self.broken = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                logger.error(
                    "%s: %s failed at run time (%s); using PyTorch for it from now on", self.name, self.backend, self.broken
                )
        self.fallback_calls += 1
        return self.fallback(*args, **kwargs)

    def _refuses(self, *args: Any, **kwargs: Any) -> str | None:
        if kwargs.get("control") is not None and not getattr(self.fast, "takes_control", False):
            return "a ControlNet is active and this UNet has no residual inputs"
        if self.accepts is None:
            return None
        if getattr(self.fast, "takes_control", False):
            return self.accepts(*args, **kwargs)  # its own acceptor judges the residuals too
        return self.accepts(*args, **{k: v for k, v in kwargs.items() if k != "control"})

    def stop_fast(self, reason: str) -> None:
        """Use PyTorch from now on (the fast path no longer computes what PyTorch does, e.g. the
        weights changed under an engine built with the old ones); logged once."""
        if self.broken is None:
            self.broken = reason
            logger.warning("%s: %s; using PyTorch for it from now on", self.name, reason)

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        return f"<GuardedCall {self.name} via {self.backend} ({state})>"
