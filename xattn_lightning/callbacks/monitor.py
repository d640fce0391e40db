"""``XAttnSaliencyMonitor``: attention–saliency agreement on fixed probe utterances during a Lightning fit.

The callback decides *when* (its hooks and schedule) and keeps the state in checkpoints; a reading itself
is :class:`xattn_lightning.monitoring.Instrument`'s, shared with the Hugging Face Trainer callback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from xattn_lightning._lightning import (
    NAMESPACES,
    LightningHost,
    first_validation_batch,
    namespace_of,
    sharded_stream,
    steps_logged,
    training_loader,
    validation_planned,
)
from xattn_lightning.adapters import Adapter
from xattn_lightning.functional import RELIABILITY_FLOOR
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec
from xattn_lightning.monitoring import PREFIX, Instrument, Messages, MonitorConfig, check_probes_source, check_schedule
from xattn_lightning.monitoring.config import READING_TIMEOUT
from xattn_lightning.saliency.options import READING_DEFAULTS
from xattn_lightning.summary import Summary

__all__ = ["PREFIX", "XAttnSaliencyMonitor"]


def _guarded(hook: str) -> Callable[..., None]:
    """The Lightning hook ``hook``, whose body ``_<hook>`` runs under the monitor's guard: whatever goes wrong
    inside is warned once per hook and cause, and training goes on (``on_error="raise"``: it is raised)."""

    def method(self: XAttnSaliencyMonitor, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if hook == "setup":  # rank-zero messages go through the trainer's package
            self._namespace = namespace_of(trainer).__name__
        with self.instrument.messages.guard(hook):
            getattr(self, "_" + hook)(trainer, *args, **kwargs)

    method.__name__ = method.__qualname__ = hook
    return override(method)


class XAttnSaliencyMonitor(Callback):
    """Tracks how far cross-attention agrees with saliency on fixed probe utterances.

    Every ``every_n_epochs`` epochs or ``every_n_steps`` optimizer steps (never in the sanity check), explains
    the probes and logs under ``xattn/``: agreement per method and metric (full average, per layer, best head),
    the corrected headline and its change since the first reading, saliency coverage, word-timestamp error
    (probes with true word times) and the seconds spent; with a ``WandbLogger`` also heatmaps, a layer × head
    grid and tables. It never stops training: what cannot work is warned once, naming the fix.

    Where the probes come from: ``probes=None``, the first ``num_probes`` validation utterances (after
    validation; under DDP the ranks' shards are put back in single-process order); ``probes=`` a DataLoader,
    a map-style or iterable (streaming) Dataset or a list of batches (no validation loop needed; with
    ``every_n_steps`` it reads after training steps). Batches are read by what they hold, whatever their
    layout (:func:`xattn_lightning.batches.standard_batch`); ``batch_keys`` or ``batch_fn`` say the rest. At
    fit start it fixes a ``probes=`` set or reads one validation batch, so that a problem is said before the
    first training step.

    Args:
        every_n_epochs / every_n_steps: schedule, exactly one (default ``every_n_epochs=1``).
        probes: probe utterances instead of validation data.
        model_fn: ``model_fn(pl_module) -> nn.Module | Adapter``; default: the module, its ``.xattn_adapter``
            or the one supported model on it (``xl.adapter_for``).
        batch_fn: ``batch_fn(batch) -> dict`` in the model's own format, or its import path
            (``"my_pkg.data:to_model_batch"``, for YAML configs); only where the batch is not read by what it holds.
        batch_keys: or where the model's entries sit in the batch, as dotted paths
            (``{"input_features": "net_input.src_tokens", "labels": "target"}``; YAML-friendly).
        tokenizer: for token labels and text; default: found on the module, its model or the DataModule.
        n_masks: masks per perturbation map; ``"auto"`` (default) chooses 256–2,048 from the first reading's
            reliability, then fixes it for the run (kept in checkpoints).
        seed: the masks' seed. max_seconds: a time budget for one whole reading (the mask count that fits is
            calibrated once, then fixed).
        saliency_options: any other :func:`xattn_lightning.explain` option by name (``p_h``, ``frame_rate``...).
        reading_timeout: several processes: seconds a process waits for the others at one step of a reading;
            past it the reading fails on every process together, warned once, and training goes on.
        max_gathered_gb: a sharded model (FSDP, FSDP2, tensor parallel) is read through a copy of its full
            parameters gathered once per reading; at most this many GiB, else readings are skipped (said once).
            ``None``: no bound (``docs/sharding.md``).
        lockstep: several processes: ``True``: every process reads every probe, each forward agreed first, for a
            model whose own forward runs collectives (an ``all_reduce``, hand-written tensor parallelism); ``False``:
            each process reads its share of the probes; ``"auto"`` (default): ``True`` when a forward of the first
            probe runs a collective (``docs/sharding.md``).
        **method_options: the same options as flat keywords (kept for existing scripts).

        The other arguments (``num_probes``, ``methods``, ``targets``, ``metrics``, ``layers``, ``heads``,
        ``log_figures``, ``max_figures``, ``num_beams``, ``max_new_tokens``, ``max_overhead``,
        ``reliability_floor``, ``export_alignment_heads``, ``on_error``, ``cache_encoder``) are documented in
        ``docs/monitor.md``; they are :class:`~xattn_lightning.monitoring.MonitorConfig`'s fields.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = XAttnSaliencyMonitor(every_n_epochs=1, num_probes=4, methods=("encoder_spes",))
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        num_probes: int = 8,
        methods: Sequence[str] = ("encoder_spes",),
        targets: Literal["generate", "labels"] = "generate",
        probes: Any = None,
        model_fn: Callable[[LightningModule], nn.Module | Adapter] | None = None,
        batch_fn: Callable[[Any], Any] | str | None = None,
        batch_keys: dict[str, str] | None = None,
        tokenizer: object | None = None,
        metrics: Sequence[str] = ("pearson", "spearman"),
        layers: LayerSpec = None,
        heads: HeadSpec = None,
        log_figures: bool = True,
        max_figures: int = 4,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        max_overhead: float | None = 0.1,
        reliability_floor: float = RELIABILITY_FLOOR,
        export_alignment_heads: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        cache_encoder: bool = True,
        n_masks: int | Literal["auto"] = READING_DEFAULTS["n_masks"],
        seed: int = READING_DEFAULTS["seed"],
        max_seconds: float | None = None,
        saliency_options: dict[str, Any] | None = None,
        reading_timeout: float = READING_TIMEOUT,
        max_gathered_gb: float | None = None,
        lockstep: bool | Literal["auto"] = "auto",
        **method_options: Any,
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_schedule(every_n_epochs, every_n_steps)
        self.every_n_steps = every_n_steps
        check_probes_source(probes)
        config = MonitorConfig.from_flat(
            {"n_masks": n_masks, "seed": seed, "max_seconds": max_seconds, **method_options},
            num_probes=num_probes, methods=methods, targets=targets, metrics=metrics, layers=layers, heads=heads,
            log_figures=log_figures, max_figures=max_figures, num_beams=num_beams, max_new_tokens=max_new_tokens,
            max_overhead=max_overhead, reliability_floor=float(reliability_floor),
            export_alignment_heads=bool(export_alignment_heads), on_error=on_error, cache_encoder=cache_encoder,
            reading_timeout=reading_timeout, max_gathered_gb=max_gathered_gb, lockstep=lockstep,
            saliency_options=saliency_options,
        )  # fmt: skip
        self.model_fn, self.tokenizer = model_fn, tokenizer
        self.instrument = Instrument(
            config, probes, Messages(on_error, info=self._say), batch_fn=batch_fn, batch_keys=batch_keys
        )
        self._validated_epoch = -1
        #: the Lightning package of the trainer (set at setup): a name, so that the monitor pickles (ddp_spawn)
        self._namespace = NAMESPACES[0]

    # ------------------------------------------------------------------ what the monitor knows, read-only views
    config = property(lambda self: self.instrument.config, doc="The reading options (a MonitorConfig).")
    methods = property(lambda self: self.config.methods)
    targets = property(lambda self: self.config.targets)
    num_probes = property(lambda self: self.config.num_probes)
    probes_source = property(lambda self: self.instrument.probe_set.source)
    method_options = property(lambda self: self.config.method_options, doc="Every explain option, by name.")
    frame_rate = property(lambda self: self.config.frame_rate, doc="Input frames per second.")
    history = property(lambda self: self.instrument.history.entries, doc="One dict of logged scalars per reading.")
    baseline = property(lambda self: self.instrument.history.baseline)
    alignment_heads = property(lambda self: self.instrument.alignment_heads, doc="Heads chosen for word timestamps.")
    head_ranking = property(lambda self: self.instrument.head_ranking)
    last_explanations = property(lambda self: self.instrument.last_explanations)
    first_explanations = property(lambda self: self.instrument.first_explanations)
    encoder_cache = property(lambda self: self.instrument.encoder_cache)
    skipped_steps = property(lambda self: self.instrument.skipped_steps, doc="Steps of readings max_overhead skipped.")
    n_masks_frozen = property(lambda self: self.instrument.masks.frozen, doc="The mask count fixed for the run.")
    probe_ids = property(lambda self: self.instrument.probe_set.ids, doc="The probes' ids (kept in checkpoints).")
    probe_positions = property(lambda self: self.instrument.probe_set.positions)

    @property
    def clock(self) -> Callable[[], float]:
        return self.instrument.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:  # e.g. a fake clock in tests
        self.instrument.budget.clock = clock

    @property
    def _lightning(self) -> ModuleType:
        return importlib.import_module(self._namespace)

    def _say(self, message: str) -> None:
        self._lightning.utilities.rank_zero_info(message)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, targets=self.targets)

    def _adapter(self, trainer: Trainer | None, pl_module: LightningModule) -> Adapter:
        target = self.model_fn(pl_module) if self.model_fn is not None else pl_module
        datamodule = getattr(trainer, "datamodule", None)
        return self.instrument.adapter(target, pl_module, self.tokenizer, pl_module, datamodule)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        with self.instrument.messages.guard("state_dict"):
            return self._state_dict()
        return {}  # the checkpoint is saved without the monitor's state; a resume starts it afresh

    def _state_dict(self) -> dict[str, Any]:
        return self.instrument.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.instrument.messages.guard("load_state_dict"):
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.instrument.load_state_dict(state_dict)

    # ------------------------------------------------------------------ hooks: each body runs under the guard
    setup = _guarded("setup")

    def _setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if namespace_of(pl_module) is not self._lightning:
            self.instrument.messages.warn_once(
                "namespaces",
                f"the Trainer comes from {self._lightning.__name__} but {type(pl_module).__name__} from "
                f"{namespace_of(pl_module).__name__}; import both from one package ({' or '.join(NAMESPACES)}).",
            )

    on_fit_start = _guarded("on_fit_start")

    def _on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        say = self.instrument.messages
        self.instrument.forget_adapter()
        if getattr(trainer, "fast_dev_run", False):
            say.warn_once(
                "fast-dev-run",
                "no readings under fast_dev_run (Lightning suppresses logging there). To try the monitor quickly, "
                "run a short fit instead: Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2).",
            )
        if self.probes_source is None and not validation_planned(trainer, pl_module):
            self._probes_from_training(trainer)
        try:
            adapter = self._adapter(trainer, pl_module)
        except Exception as err:
            say.warn_once(
                "no-model",
                f"nothing will be logged: no supported model was found on {type(pl_module).__name__} ({err}). "
                "Pass model_fn=lambda module: <the model or an xl.HookAdapter>.",
                err,
            )
            return
        self.instrument.check_adapter(adapter, type(pl_module).__name__, guessed=self.model_fn is None)
        validates = self.probes_source is None and validation_planned(trainer, pl_module)
        self.instrument.check_before_training(adapter, (lambda: first_validation_batch(trainer)) if validates else None)

    def _probes_from_training(self, trainer: Trainer) -> None:
        """No validation loop and no ``probes=``: the first ``num_probes`` training utterances (items of the
        training set in its own order, collated alone; its sampler is never drawn from) are the probes."""
        say = self.instrument.messages
        try:
            loader = training_loader(trainer)
        except Exception:  # the fit itself will say what is wrong with its data
            loader = None
        if loader is None or not hasattr(loader, "dataset"):
            say.warn_once(
                "no-probes",
                "nothing will be logged: there is no validation loop (validation_step and val data) to take "
                "probe utterances from, nor a training DataLoader. Pass probes=<a DataLoader, Dataset or list of "
                "batches> (a few held-out utterances), or add a validation loop.",
            )
            return
        self.instrument.probe_set.source = loader
        say.info(
            f"no validation loop: the probes are the first {self.num_probes} training utterances, read after each "
            "due epoch's training. For held-out utterances pass probes=<a DataLoader, Dataset or list of batches>."
        )

    on_train_start = _guarded("on_train_start")

    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.instrument.budget.start()

    on_fit_end = _guarded("on_fit_end")

    def _on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from xattn_lightning.loggers import offline_sync_hint

        self.instrument.say_run_end()
        if self.config.export_alignment_heads:
            self.instrument.export_alignment_heads(self._adapter(trainer, pl_module))
        for lg in trainer.loggers:
            try:
                hint = offline_sync_hint(lg)
            except Exception:  # never fail the end of training over a hint
                hint = None
            if hint:
                self.instrument.messages.info(f"the W&B run was logged offline; upload it with: {hint}")

    on_validation_epoch_start = _guarded("on_validation_epoch_start")

    def _on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probes_source is None:
            self.instrument.probe_set.start_pass(*(sharded_stream(trainer) if trainer.world_size > 1 else (1, 0)))

    on_validation_batch_end = _guarded("on_validation_batch_end")

    def _on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0:
            self.instrument.take_validation_batch(batch, self._model_or_none(trainer, pl_module))

    def _model_or_none(self, trainer: Trainer, pl_module: LightningModule) -> Adapter | None:
        try:
            return self._adapter(trainer, pl_module)
        except Exception:  # reported where the model is needed; batches are read by their names meanwhile
            return None

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Trainer) -> bool:
        last = self.instrument.last_step
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False) or trainer.global_step == last:
            return False
        if self.every_n_epochs is not None:
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        step, every = trainer.global_step, int(self.every_n_steps or 1)
        return step >= every if last < 0 else step - last >= every

    on_validation_epoch_end = _guarded("on_validation_epoch_end")

    def _on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validated_epoch = trainer.current_epoch
        if self.every_n_steps is not None and self.probes_source is not None:
            return  # step schedule with own probes: runs after training steps
        if self._due(trainer):
            self._scheduled_run(trainer, pl_module, steps_logged(trainer))

    on_train_batch_end = _guarded("on_train_batch_end")

    def _on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is None or self.probes_source is None:
            return
        if self._due(trainer) and trainer.global_step % self.every_n_steps == 0:
            self._scheduled_run(trainer, pl_module, steps_logged(trainer))

    on_train_epoch_end = _guarded("on_train_epoch_end")

    def _on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None or self._validated_epoch == trainer.current_epoch or not self._due(trainer):
            return
        if self.probes_source is None:
            self.instrument.skip("no validation ran where a reading was due", "pass probes=... or add a validation loop")
            if "no-probes" not in self.instrument.messages.warned:  # else already told at fit start
                self.instrument.messages.warn_once(
                    "no-validation-run",
                    f"no validation ran in epoch {trainer.current_epoch}, where a reading was due; the monitor takes "
                    "its probes from validation. Pass probes=... to run without validation.",
                )
            return
        self._scheduled_run(trainer, pl_module, max(steps_logged(trainer) - 1, 0))

    def _scheduled_run(self, trainer: Trainer, pl_module: LightningModule, log_step: int) -> None:
        if "no-model" in self.instrument.messages.warned and trainer.world_size == 1:  # told at fit start (under
            try:  # DDP every rank takes part, so that no collective waits for a rank that skipped)
                self._adapter(trainer, pl_module)
            except Exception:
                self.instrument.skip("no supported model was found", "pass model_fn=...")
                return
        host = LightningHost(trainer, self.instrument.messages)
        if not self.instrument.within_budget(host, trainer.global_step, log_step):
            return
        start = self.clock()
        try:
            self.run(trainer, pl_module, log_step=log_step)
        finally:
            self.instrument.budget.spent(self.clock() - start)

    def run(self, trainer: Trainer, pl_module: LightningModule, log_step: int | None = None) -> Summary | None:
        """Explain the probes now and log at ``log_step`` (default: the trainer's global step); returns the
        summary (``None`` when nothing could be read)."""
        return self.instrument.read(
            LightningHost(trainer, self.instrument.messages),
            lambda: self._adapter(trainer, pl_module),
            step=trainer.global_step,
            log_step=log_step,
            epoch=trainer.current_epoch,
        )
