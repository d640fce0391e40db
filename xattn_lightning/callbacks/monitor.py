"""``XAttnSaliencyMonitor``: attention–saliency agreement on fixed probe utterances during a Lightning fit. It
decides *when* (its hooks and schedule) and keeps the state in checkpoints; a reading itself is
:class:`xattn_lightning.monitoring.Instrument`'s, shared with the Hugging Face Trainer callback."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

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
from xattn_lightning.monitoring import (
    PREFIX,
    Instrument,
    InstrumentViews,
    Messages,
    MonitorConfig,
    MonitorOptions,
    check_probes_source,
    check_schedule,
)
from xattn_lightning.summary import Summary

__all__ = ["PREFIX", "XAttnSaliencyMonitor"]

@dataclass(eq=False)  # eq=False: compared and hashed by identity, as Lightning's callbacks are
class XAttnSaliencyMonitor(InstrumentViews, MonitorOptions, Callback):
    """Tracks how far cross-attention agrees with saliency on fixed probe utterances.

    Every ``every_n_epochs`` epochs or ``every_n_steps`` optimizer steps (never in the sanity check), explains
    the probes and logs under ``xattn/``: agreement per method and metric (full average, per layer, best head),
    the corrected headline and its change since the first reading, saliency coverage, word-timestamp error
    (probes with true word times) and the seconds spent; with a ``WandbLogger`` also heatmaps, a layer × head
    grid and tables. It never stops training: what cannot work is warned once, naming the fix.

    The probes: ``probes=None``, the first ``num_probes`` validation utterances (under DDP the ranks' shards
    put back in single-process order; without a validation loop, training utterances); ``probes=`` a DataLoader,
    a Dataset (map-style or streaming) or a list of batches. Batches are read by what they hold
    (:func:`xattn_lightning.batches.standard_batch`); ``batch_keys`` or ``batch_fn`` say the rest. At fit start
    it fixes a ``probes=`` set or reads one validation batch, so that a problem is said before the first step.

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

        The other arguments, the reading options (keyword-only), are the fields of
        :class:`~xattn_lightning.monitoring.MonitorOptions`, documented there with their defaults; the Hugging Face
        callback takes the same. ``monitor.config`` holds them checked (a
        :class:`~xattn_lightning.monitoring.MonitorConfig`), read when the monitor is made.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = XAttnSaliencyMonitor(every_n_epochs=1, num_probes=4, methods=("encoder_spes",))
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    probes: Any = field(default=None, repr=False)
    model_fn: Callable[[LightningModule], nn.Module | Adapter] | None = field(default=None, repr=False)
    batch_fn: Callable[[Any], Any] | str | None = field(default=None, repr=False)
    batch_keys: dict[str, str] | None = None
    tokenizer: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.every_n_epochs = check_schedule(self.every_n_epochs, self.every_n_steps)
        check_probes_source(self.probes)
        self.instrument = Instrument(
            MonitorConfig.of(self),
            self.probes,
            Messages(self.on_error, info=self._say),
            batch_fn=self.batch_fn,
            batch_keys=self.batch_keys,
        )
        self._validated_epoch = -1
        #: the Lightning package of the trainer (set at setup): a name, so that the monitor pickles (ddp_spawn)
        self._namespace = NAMESPACES[0]

    @property
    def _lightning(self) -> ModuleType:
        return importlib.import_module(self._namespace)

    @property
    def _own_probes(self) -> bool:
        """Whether the probes come from ``probes=`` (or the training set) rather than validation."""
        return self.instrument.collector.probe_set.source is not None

    def _say(self, message: str) -> None:
        self._lightning.utilities.rank_zero_info(message)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.config.methods, targets=self.config.targets)

    def _adapter(self, trainer: Trainer | None, pl_module: LightningModule) -> Adapter:
        target = self.model_fn(pl_module) if self.model_fn is not None else pl_module
        datamodule = getattr(trainer, "datamodule", None)
        return self.instrument.adapter(target, pl_module, self.tokenizer, pl_module, datamodule)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        with self.instrument.messages.guard("state_dict"):
            return self.instrument.state_dict()
        return {}  # the checkpoint is saved without the monitor's state; a resume starts it afresh

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.instrument.messages.guard("load_state_dict"):
            self.instrument.load_state_dict(state_dict)

    # ------------------------------------------------------------------ hooks: whatever goes wrong in one is warned
    # once per hook and cause (the guard), and training goes on (on_error="raise": it is raised)
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._namespace = namespace_of(trainer).__name__  # rank-zero messages go through the trainer's package
        with self.instrument.messages.guard("setup"):
            if namespace_of(pl_module) is not self._lightning:
                self.instrument.messages.warn_once(
                    "namespaces",
                    f"the Trainer comes from {self._lightning.__name__} but {type(pl_module).__name__} from "
                    f"{namespace_of(pl_module).__name__}; import both from one package ({' or '.join(NAMESPACES)}).",
                )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.instrument.messages.guard("on_fit_start"):
            self._check_before_training(trainer, pl_module)

    def _check_before_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say before the first step what will not work: no model, no probes, a batch that cannot be read."""
        inst = self.instrument
        inst.forget_adapter()
        if getattr(trainer, "fast_dev_run", False):
            inst.messages.warn_once(
                "fast-dev-run",
                "no readings under fast_dev_run (Lightning suppresses logging there). To try the monitor quickly, "
                "run a short fit instead: Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2).",
            )
        validates = validation_planned(trainer, pl_module)
        if not self._own_probes and not validates:
            self._probes_from_training(trainer)
        try:
            adapter = self._adapter(trainer, pl_module)
        except Exception as err:
            inst.model_missing = True
            inst.messages.warn_once(
                "no-model",
                f"nothing will be logged: no supported model was found on {type(pl_module).__name__} ({err}). "
                "Pass model_fn=lambda module: <the model or an xl.HookAdapter>.",
                err,
            )
            return
        inst.model_missing = False
        inst.check_adapter(adapter, type(pl_module).__name__, guessed=self.model_fn is None)
        sample = (lambda: first_validation_batch(trainer)) if not self._own_probes and validates else None
        inst.collector.check_before_training(adapter, sample)

    def _probes_from_training(self, trainer: Trainer) -> None:
        """No validation loop and no ``probes=``: the first ``num_probes`` training utterances (items of the
        training set in its own order, collated alone; its sampler is never drawn from) are the probes."""
        inst = self.instrument
        try:
            loader = training_loader(trainer)
        except Exception:  # the fit itself will say what is wrong with its data
            loader = None
        if loader is None or not hasattr(loader, "dataset"):
            inst.collector.unavailable = True
            inst.messages.warn_once(
                "no-probes",
                "nothing will be logged: there is no validation loop (validation_step and val data) to take "
                "probe utterances from, nor a training DataLoader. Pass probes=<a DataLoader, Dataset or list of "
                "batches> (a few held-out utterances), or add a validation loop.",
            )
            return
        inst.collector.probe_set.source = loader
        inst.messages.info(
            f"no validation loop: the probes are the first {self.config.num_probes} training utterances, read after "
            "each due epoch's training. For held-out utterances pass probes=<a DataLoader, Dataset or list of batches>."
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.instrument.messages.guard("on_train_start"):
            self.instrument.reader.budget.start()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from xattn_lightning.loggers import offline_sync_hint

        with self.instrument.messages.guard("on_fit_end"):
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

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.instrument.messages.guard("on_validation_epoch_start"):
            if not self._own_probes:
                stream = sharded_stream(trainer) if trainer.world_size > 1 else (1, 0)
                self.instrument.collector.probe_set.start_pass(*stream)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with self.instrument.messages.guard("on_validation_batch_end"):
            if dataloader_idx == 0:
                self.instrument.collector.take_validation_batch(batch, self._model_or_none(trainer, pl_module))

    def _model_or_none(self, trainer: Trainer, pl_module: LightningModule) -> Adapter | None:
        try:  # (a missing model is reported where it is needed; batches are read by their names meanwhile)
            return self._adapter(trainer, pl_module)
        except Exception:
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

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.instrument.messages.guard("on_validation_epoch_end"):
            if trainer.sanity_checking:
                return
            self._validated_epoch = trainer.current_epoch
            if self.every_n_steps is not None and self._own_probes:
                return  # step schedule with own probes: runs after training steps
            if self._due(trainer):
                self._scheduled_run(trainer, pl_module, steps_logged(trainer))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with self.instrument.messages.guard("on_train_batch_end"):
            if self.every_n_steps is None or not self._own_probes:
                return
            if self._due(trainer) and trainer.global_step % self.every_n_steps == 0:
                self._scheduled_run(trainer, pl_module, steps_logged(trainer))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.instrument.messages.guard("on_train_epoch_end"):
            if self.every_n_epochs is None or self._validated_epoch == trainer.current_epoch or not self._due(trainer):
                return
            if self._own_probes:
                self._scheduled_run(trainer, pl_module, max(steps_logged(trainer) - 1, 0))
                return
            inst = self.instrument
            inst.reader.skip("no validation ran where a reading was due", "pass probes=... or add a validation loop")
            if not inst.collector.unavailable:  # else already told at fit start
                inst.messages.warn_once(
                    "no-validation-run",
                    f"no validation ran in epoch {trainer.current_epoch}, where a reading was due; the monitor takes "
                    "its probes from validation. Pass probes=... to run without validation.",
                )

    def _scheduled_run(self, trainer: Trainer, pl_module: LightningModule, log_step: int) -> None:
        inst = self.instrument
        if inst.model_missing and trainer.world_size == 1:  # told at fit start (under DDP every rank takes part,
            try:  # so that no collective waits for a rank that skipped)
                self._adapter(trainer, pl_module)
            except Exception:
                inst.reader.skip("no supported model was found", "pass model_fn=...")
                return
        host = LightningHost(trainer, inst.messages)
        if not inst.reader.within_budget(host, trainer.global_step, log_step):
            return
        start = self.clock()
        try:
            self.run(trainer, pl_module, log_step=log_step)
        finally:
            inst.reader.budget.spent(self.clock() - start)

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
