"""Applying control updates: on the engine thread, between frames, never in the middle of one.

Each update drained from the control queue goes to its owner: live parameters, brush and LoRA
edits to the engine (which validates them against the schema and keeps what is in force), pause,
bypass and preset to the node, a model change to the loader (model_switch.py), a LoRA edit with
heavy work (a file to read, weights to merge) to the LoRA loader (lora_loader.py), a ControlNet
edit with a model to load to the ControlNet loader (the same class), whose plans are committed
here between frames; the external ControlNet maps that arrived go to the engine. Every outcome is reported on the queue
(`ControlQueue.report`): an update that cannot be applied costs one log line (rate-limited), an
error reply and nothing else; the node keeps streaming.

A preset replaces the look: its live values (as live updates, so prompts blend in), its
brushes, LoRAs and ControlNets (all current ones go), and, with --allow-model-switch, its model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamnode.config import load_config
from streamnode.control.updates import ENGINE_KEYS, Update
from streamnode.engine import Engine
from streamnode.live_params import MASK_SOURCES, LiveParams, LiveState
from streamnode.log_limit import LogLimiter, held_text
from streamnode.node import heap
from streamnode.node.lora_loader import LoraJob, LoraLoader
from streamnode.node.model_switch import LoadJob
from streamnode.node.tempo import TEMPO_KEYS

if TYPE_CHECKING:
    from streamnode.node.lifecycle import Node

logger = logging.getLogger(__name__)

LIVE_KEYS = frozenset(LiveParams.model_fields)
"""The schema's live parameters: plain values the engine takes together in one `update`."""


class Deferred(Exception):
    """Raised by an apply step that finishes later (a model load): reported when it does."""


class Applier:
    """The engine thread's handler of control updates."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._log_limit = LogLimiter()

    # -- the queue

    def apply_pending(self) -> None:
        """Poll the brush mask channels, commit the LoRA edits planned meanwhile, then apply every
        queued update, reporting each."""
        node = self.node
        if self._poll_masks():
            node.publish_live()
        self._poll_control_maps()
        self._commit_planned(node.lora_loader)
        self._commit_planned(node.controlnet_loader)
        batch: list[Update] = []
        for update in node.queue.drain():
            if node.tempo.hold(update):  # a quantized change waits for its beat (node/tempo.py)
                continue
            if update.key in LIVE_KEYS:
                batch.append(update)
                continue
            self.apply_live(batch)  # what arrived before it applies before it
            batch = []
            self.apply_one(update)
        self.apply_live(batch)
        node.control_maps.sync(node.live().controlnets)

    def apply_live(self, updates: list[Update]) -> None:
        """Live-parameter updates (distinct keys: the queue keeps one per key) in one engine update:
        one validation and one published state per frame however many faders move, which is what
        keeps a storm of MIDI, DMX and LFO changes cheap (docs/tempo.md). When the engine refuses the
        set, each is applied on its own, so every refusal is reported against its own update and
        the others still apply (a pair the schema forbids together, like prompt and prompt_blend,
        applies in arrival order: the later one replaces the earlier)."""
        if len(updates) <= 1:
            for update in updates:
                self.apply_one(update)
            return
        node = self.node
        engine = node.engine
        assert engine is not None
        try:
            engine.update(**{update.key: update.value for update in updates})
        except Exception:  # noqa: BLE001 - found out one by one below, each reported
            for update in updates:
                self.apply_one(update)
            return
        self._leave_preset()
        node.publish_live()  # before the reports: whoever hears of them reads the new state
        for update in updates:
            node.queue.report(update)

    def apply_one(self, update: Update) -> None:
        """Apply one update and report it (applied, or why not)."""
        node = self.node
        try:
            self.apply(update)
        except Deferred:
            return
        except Exception as e:  # noqa: BLE001 - a bad value is reported, never fatal
            self.failed(update, str(e) or type(e).__name__)
            return
        node.publish_live()  # before the report: whoever hears of it reads the new state
        node.queue.report(update)
        if update.key == "controlnet":  # its map worker starts now, also for a change released on its beat
            node.control_maps.sync(node.live().controlnets)

    def failed(self, update: Update, reason: str) -> None:
        node = self.node
        node.publish_live()  # a preset may have applied part of itself before the failing part
        node.set_error(f"{update.origin or update.key}: {reason}")
        if (held := self._log_limit(f"update:{update.slot}")) is not None:
            logger.warning("cannot apply %s: %s%s", update.origin or update.key, reason, held_text(held))
        node.queue.report(update, reason)

    def apply(self, update: Update) -> None:
        key, value = update.key, update.value
        node = self.node
        engine = node.engine
        assert engine is not None
        if key in ENGINE_KEYS:
            engine.update(**{key: value})
        elif key in ("pause", "bypass"):
            node.set_switches(**{key: bool(value)})
            return  # the preset's values are still in force
        elif key == "preset":
            self._apply_preset(str(value), update)
            return
        elif key == "model":
            self._request_model(str(value), update)
            raise Deferred
        elif key == "brush":
            self.apply_brush(value, engine)
        elif key == "lora":
            self.apply_lora(update, engine)
        elif key == "controlnet":
            self.apply_controlnet(update, engine)
        elif key in TEMPO_KEYS:
            node.tempo.apply(update, self)
            if key not in ("cue", "cue_next"):
                return  # tempo settings, LFOs, cues: the look is still the preset's
        else:
            raise ValueError(f"unknown control key {key!r}")
        self._leave_preset()

    def _leave_preset(self) -> None:
        """A change of the look was applied: it is no longer the preset's."""
        if self.node.switches.preset:
            self.node.set_switches(preset="")

    # -- presets and models

    def _apply_preset(self, name: str, update: Update) -> None:
        node, engine = self.node, self.node.engine
        assert engine is not None
        cfg = load_config(preset=name)
        state = engine.live_params()
        for change in state.params.updates_to(cfg.stream.live):
            engine.update(**change)
        # The preset's brushes replace the current ones.
        for index in state.brush_order:
            self.apply_brush((index, "clear", None), engine)
        for index, brush in enumerate(cfg.brushes):
            for field_name, field_value in brush.model_dump(exclude_defaults=True).items():
                self.apply_brush((index, field_name, field_value), engine)
        # So do its LoRAs: each one edit (read and merged once), reported on its own when planned.
        wanted = {index: lora.model_dump() for index, lora in enumerate(cfg.loras)}
        for index, lora in state.loras.items():
            if wanted.get(index) != lora.model_dump():
                self.apply_lora(Update("lora", (index, "clear", None), origin=""), engine, deferred_ok=True)
        for index, fields in wanted.items():
            if state.loras.get(index) is None or state.loras[index].model_dump() != fields:
                self.apply_lora(Update("lora", (index, fields), origin=""), engine, deferred_ok=True)
        # And its ControlNets, each one edit (a model loaded off the engine thread).
        wanted = {index: net.model_dump() for index, net in enumerate(cfg.controlnets)}
        for index, net in state.controlnets.items():
            if wanted.get(index) != net.model_dump():
                self.apply_controlnet(Update("controlnet", (index, "clear", None), origin=""), engine, deferred_ok=True)
        for index, fields in wanted.items():
            if state.controlnets.get(index) is None or state.controlnets[index].model_dump() != fields:
                self.apply_controlnet(Update("controlnet", (index, fields), origin=""), engine, deferred_ok=True)
        node.tempo.replace_all(cfg.lfos, cfg.cues)
        node.set_switches(preset=name)
        now = node.config
        fixed = [k for k in ("width", "height", "frame_buffer_size", "cfg_type", "mode")
                 if getattr(cfg.stream, k) != getattr(now.stream, k)]
        if cfg.model.id != now.model.id:
            if now.osc.allow_model_switch:
                self._request_model(cfg.model.id, update)
            else:
                fixed.append("model (start with --allow-model-switch to switch it live)")
        if fixed:
            logger.info("preset %s: live values applied; %s need a restart", name, ", ".join(fixed))

    def _request_model(self, model_id: str, update: Update) -> None:
        node = self.node
        if not node.config.osc.allow_model_switch:
            raise PermissionError("switching models is off; start the node with --allow-model-switch")
        state = node.live()
        # Built for the steps in force, not the config's: its accelerated models are then made for
        # the shapes it will run (another process makes what the cache lacks: node/prebuild.py).
        stream = node.config.stream.model_copy(update={"t_index_list": tuple(state.params.t_index_list), "strength": None})
        config = node.config.model_copy(update={"model": node.config.model.model_copy(update={"id": model_id}),
                                                "stream": stream})
        node.loader.request(LoadJob(config, update, state, node.recent_input(), txt2img=node.txt2img))

    def swap_in(self, new: Engine, job: LoadJob) -> None:
        """Make a loaded engine the node's (engine thread, at a frame boundary). What changed since
        it was prepared arrives as live updates; the engine that loses is closed in any case."""
        node = self.node
        old = node.engine
        try:
            _catch_up(new, job.state, node.live())
        except BaseException:
            new.close()
            raise
        try:
            node.install_engine(new, job.config)
        finally:
            if old is not None:
                node.loader.retire(old)  # closed off this thread; its model freed when closed (no cycles)
            del old
        if node.freeze_heap:
            heap.collect_after_switch()  # what the load left as garbage goes now, not mid-frame later
        for index, image in node.control_maps.held():
            try:
                new.set_control_map(index, image)  # the external maps in force hold across the switch
            except Exception as e:  # noqa: BLE001 - a map that no longer fits is reported, never fatal
                node.set_error(f"controlnet {index} map: {e}")
        logger.info("model switched to %s", job.config.model.id)

    # -- LoRAs

    def apply_lora(self, update: Update, engine: Engine, *, deferred_ok: bool = False) -> None:
        """A LoRA edit ((index, field or "clear", value), or (index, {fields})): at once when it is
        light and nothing is waiting before it, else planned on the LoRA loader's thread (Deferred,
        unless `deferred_ok`: then it is reported when committed, and this returns)."""
        self._apply_loaded(update, engine, "lora", self.node.lora_loader, engine.lora_heavy, deferred_ok)

    def apply_controlnet(self, update: Update, engine: Engine, *, deferred_ok: bool = False) -> None:
        """A ControlNet edit, like a LoRA edit: at once when it loads no model and nothing waits
        before it, else on the ControlNet loader's thread (Deferred unless `deferred_ok`)."""
        self._apply_loaded(update, engine, "controlnet", self.node.controlnet_loader, engine.controlnet_heavy,
                           deferred_ok)

    def _apply_loaded(self, update: Update, engine: Engine, key: str, loader: LoraLoader,
                      heavy: Callable[[tuple[Any, ...]], bool], deferred_ok: bool) -> None:
        """An edit of a group whose heavy edits (a file to read, weights to merge) are planned off
        the engine thread: `loader` plans them; `heavy(edit)` says which are."""
        index = int(update.value[0])
        limit = getattr(self.node.config.runtime, f"max_{key}s")
        if not 0 <= index < limit:
            raise ValueError(f"{key} {update.value[0]}: use 0..{limit - 1}")
        edit = (index, *update.value[1:])
        if loader.busy() or heavy(edit):
            loader.request(LoraJob(update, engine, edit))
            if deferred_ok:
                return
            raise Deferred
        engine.update(**{key: edit})

    def _poll_control_maps(self) -> None:
        """Hand the engine the external ControlNet maps that arrived (node/control_maps.py)."""
        node = self.node
        engine = node.engine
        for index, image in node.control_maps.poll():
            try:
                assert engine is not None
                engine.set_control_map(index, image)
            except Exception as e:  # noqa: BLE001 - a bad map is reported, never fatal
                node.set_error(f"controlnet {index} map: {e}")
                if (held := self._log_limit(f"controlnet-map:{index}")) is not None:
                    logger.warning("controlnet %d: cannot use its map: %s%s", index, e, held_text(held))

    def _commit_planned(self, loader: LoraLoader) -> None:
        """Commit the plans a loader (LoRAs, ControlNets) finished (engine thread, between frames);
        report each."""
        node = self.node
        group = loader.group
        for planned in loader.take():
            update, index = planned.job.update, planned.job.edit[0]
            engine = node.engine
            try:
                if planned.error:
                    raise ValueError(planned.error)
                assert engine is not None
                if planned.job.engine is engine:
                    engine.update(**{group: planned.plan})
                else:
                    engine.update(**{group: planned.job.edit})  # a model switch came between: plan it here
            except Exception as e:  # noqa: BLE001 - a bad LoRA or ControlNet is reported, never fatal
                self.failed(update, f"{group} {index}: {e}")
                continue
            node.publish_live()
            node.queue.report(update)
        loader.committed()

    # -- brushes

    def apply_brush(self, value: tuple[int, str, Any], engine: Engine) -> None:
        """One brush edit (index, BrushParams field or "clear", value): to the engine, or for
        `shm`, to the mask-channel reader that feeds the engine the brush's plane."""
        node = self.node
        index, field_name, field_value = value
        i = int(index)
        limit = node.config.runtime.max_brushes
        if not 0 <= i < limit:
            raise ValueError(f"brush {index}: use 0..{limit - 1}")
        channels = node.mask_channels
        if field_name == "shm":
            channels.bind(i, str(field_value))  # validates the URI before the engine changes
            # Until the channel delivers this brush's plane, the brush paints nothing.
            engine.update(brush=(i, "mask", None))
        else:
            engine.update(brush=(i, field_name, field_value))
            if field_name in (*MASK_SOURCES, "clear"):
                channels.unbind(i)

    def setup_brushes(self, engine: Engine) -> None:
        """The config's `[[brushes]]` onto the first engine, before the first frame; raises with the
        brush's number when one cannot be applied (the start fails with the reason)."""
        for i, brush in enumerate(self.node.config.brushes):
            try:
                for field_name, field_value in brush.model_dump(exclude_defaults=True).items():
                    self.apply_brush((i, field_name, field_value), engine)
            except Exception as e:
                raise ValueError(f"brush {i}: {e}") from e

    def _poll_masks(self) -> bool:
        """Hand the engine the brush masks that changed in shm:// mask channels (a header read when
        none did); True if any did."""
        node = self.node
        channels = node.mask_channels
        if not channels:
            return False
        engine = node.engine
        assert engine is not None
        changed = False
        for i, mask in channels.poll():
            try:
                engine.update(brush=(i, "mask", mask))
                changed = True
            except Exception as e:  # noqa: BLE001 - a bad plane is reported, never fatal
                node.set_error(f"brush {i} mask: {e}")
                if (held := self._log_limit(f"brush-mask:{i}")) is not None:
                    logger.warning("brush %d: cannot use its shm mask: %s%s", i, e, held_text(held))
        return changed


def _catch_up(engine: Engine, prepared: LiveState, now: LiveState) -> None:
    """Bring an engine prepared with `prepared` to `now`: live updates, brush by brush."""
    for change in prepared.params.updates_to(now.params):
        engine.update(**change)
    for index in prepared.brush_order:
        if index not in now.brushes:
            engine.update(brush=(index, "clear", None))
    for index in now.brush_order:
        brush = now.brushes[index]
        if prepared.brushes.get(index) != brush:
            engine.update(brush=(index, brush.edit()))
    if engine.live_params().brush_order != now.brush_order and now.brush_order:
        engine.update(brush_order=now.brush_order)
    for index in prepared.loras:
        if index not in now.loras:
            engine.update(lora=(index, "clear", None))
    for index, lora in now.loras.items():
        if prepared.loras.get(index) != lora:
            engine.update(lora=(index, lora.model_dump()))
    for index in prepared.controlnets:
        if index not in now.controlnets:
            engine.update(controlnet=(index, "clear", None))
    for index, net in now.controlnets.items():
        if prepared.controlnets.get(index) != net:
            engine.update(controlnet=(index, net.model_dump()))
