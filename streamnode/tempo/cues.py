"""The cue list: prompts and seeds that step on the beat.

Cues are `/cues/N/...` entries (live_params.CueParams). `/cue N` goes to cue N, `/cue_next` to
the next one in index order (wrapping), and with `/cue_every B` the node steps by itself on
every B-th bar line. Going to a cue is an ordinary set of live changes (its transition, prompt,
seed), so it is quantized, echoed and reported like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamnode.live_params import CueParams


def next_index(cues: Mapping[int, CueParams], current: int) -> int | None:
    """The cue after `current` in index order, wrapping; None when the list is empty."""
    if not cues:
        return None
    order = sorted(cues)
    return next((i for i in order if i > current), order[0])


def changes(cue: CueParams) -> dict[str, Any]:
    """The live changes that put `cue` in force: its transition first (the prompt blends in over
    it), its prompt, and its seed unless it keeps the seed (-1)."""
    out: dict[str, Any] = {"prompt_transition_frames": cue.transition, "prompt": cue.prompt}
    if cue.seed >= 0:
        out["seed"] = cue.seed
    return out


def due_steps(bar_before: float, bar_now: float, every: int) -> bool:
    """True when a `every`-bar line lies in (bar_before, bar_now]: time to step (auto-advance)."""
    if every <= 0 or bar_now <= bar_before:
        return False
    return int(bar_now // every) > int(bar_before // every)
