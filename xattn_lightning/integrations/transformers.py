"""``XAttnSaliencyCallback``: the monitor in a Hugging Face ``Trainer`` / ``Seq2SeqTrainer`` fine-tune.

The same readings, options, probes, headline, intervals, head ranking and word-timestamp metrics as the
Lightning :class:`~xattn_lightning.XAttnSaliencyMonitor` (both are hosts of
:class:`~xattn_lightning.monitoring.Instrument`); it reads after each evaluation, or every ``every_n_steps``
optimizer steps.

The one line a Whisper fine-tuning script adds, after it built the trainer::

    from xattn_lightning.integrations.transformers import XAttnSaliencyCallback

    trainer.add_callback(XAttnSaliencyCallback(trainer, num_probes=8))

Scalars go where the Trainer's own metrics go, through ``trainer.log``: ``trainer.state.log_history`` and
every ``report_to`` integration, at the evaluation's step (the Trainer's W&B integration files them under
``train/xattn/...``, as every metric that is not an ``eval_`` one; the media go beside them). With an active W&B run (``report_to="wandb"``)
it also logs heatmaps, the layer × head grid and tables. Under multi-process training (torchrun,
accelerate) each process explains its share of the probes and process 0 logs media.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from xattn_lightning.adapters import Adapter
from xattn_lightning.batches import ID_KEYS, TEXT_KEYS, WORDS_KEY
from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring import Instrument, InstrumentViews, Messages, check_probes_source
from xattn_lightning.monitoring.config import MonitorConfig, MonitorOptions
from xattn_lightning.monitoring.core import TorchDistributed
from xattn_lightning.monitoring.probes import first_items, iter_once
from xattn_lightning.summary import Summary


class _WandbRunMedia:
    """Figures and tables into the active W&B run, at the Trainer's step axis (``train/global_step``, which the
    Trainer's W&B integration declares), with the ``log_image``/``log_table`` calls of Lightning's logger. Their
    keys take the ``train/`` prefix the integration gives every scalar that is not an ``eval_`` metric, so that
    media and scalars (``train/xattn/...``) share one section of the run."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def log_image(self, key: str, images: list[Any], step: int, caption: list[str] | None = None) -> None:
        import wandb

        captions: list[Any] = list(caption) if caption else [None] * len(images)
        self.run.log(
            {"train/" + key: [wandb.Image(i, caption=c) for i, c in zip(images, captions)], "train/global_step": step}
        )

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int) -> None:
        import wandb

        self.run.log({"train/" + key: wandb.Table(columns=list[Any](columns), data=data), "train/global_step": step})


class TrainerHost(TorchDistributed):
    """The :class:`~xattn_lightning.monitoring.Host` of a Hugging Face Trainer: ``torch.distributed`` collectives
    when the Trainer runs several processes (:class:`~xattn_lightning.monitoring.core.TorchDistributed`), scalars
    through ``trainer.log`` (or the state's ``log_history`` when no trainer was given), media to the active W&B
    run."""

    def __init__(self, trainer: Any, state: TrainerState, args: TrainingArguments, messages: Messages) -> None:
        super().__init__()
        self.trainer, self.state, self.messages = trainer, state, messages
        self.report_to = list(getattr(args, "report_to", None) or [])
        #: the wrapped model (accelerate's FSDP wrapper, say): a sharded one is read through an unsharded copy
        self.root = getattr(trainer, "model_wrapped", None) or getattr(trainer, "model", None)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Through ``trainer.log`` (else ``log_history`` and the W&B run)."""
        if self.trainer is not None:
            self.trainer.log(dict(scalars))  # log_history and every report_to integration, at state.global_step
            return
        self.state.log_history.append({**scalars, "step": step})
        run = self._wandb_run()
        if run is not None and self.rank == 0:
            run.log({**{"train/" + k: v for k, v in scalars.items()}, "train/global_step": step})

    def media_loggers(self) -> list[Any]:
        """The active W&B run, when ``report_to`` has W&B."""
        run = self._wandb_run()
        return [_WandbRunMedia(run)] if run is not None else []

    def _wandb_run(self) -> Any:
        if "wandb" not in self.report_to:
            return None
        import wandb

        return wandb.run


def _with_item_facts(batch: Any, item: Any) -> Any:
    """A collated one-item batch with the item's id, reference text and true word timings, which a collator
    leaves out (the model does not take them) but the monitor shows and scores."""
    if isinstance(item, Mapping) and isinstance(batch, MutableMapping):
        for key in (*ID_KEYS, *TEXT_KEYS, WORDS_KEY):
            if key in item and key not in batch:
                batch[key] = [item[key]]
    return batch


def _first_collated(loader: Any) -> Any:
    """The first item of a DataLoader's dataset, collated alone by its own collator (``None`` without one); the
    loader's own iterator is never touched."""
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or iter_once(dataset):
        return None
    item = next(iter(first_items(dataset, 1, "the training set")), None)
    return None if item is None else collate([item])


@dataclass(eq=False)  # eq=False: compared and hashed by identity, as the Trainer's callbacks are
class XAttnSaliencyCallback(InstrumentViews, MonitorOptions, TrainerCallback, ExportableState):
    """Attention–saliency agreement on fixed probe utterances during a Hugging Face Trainer fine-tune.

    Args:
        trainer: the ``Trainer``/``Seq2SeqTrainer`` (its ``log`` carries the scalars to ``log_history`` and every
            ``report_to`` integration, its eval set gives the probes). Without it (a callback passed in
            ``callbacks=[...]``) scalars go to ``state.log_history`` and the W&B run only (one warning says so).
        every_n_steps: read every that many optimizer steps instead of after each evaluation.
        probes: probe utterances (a DataLoader, a map-style or iterable Dataset, or a list of batches); default:
            the first ``num_probes`` items of the eval set (map-style or streaming ``IterableDataset``; the first
            of several; without one, of the training set), each collated alone by the Trainer's data collator,
            from a fresh iterator. Readings follow each evaluation, or each epoch when the Trainer never
            evaluates, or every ``every_n_steps`` steps.
        model_fn: ``model_fn(model) -> nn.Module | Adapter``; default: the Trainer's model.
        batch_fn, batch_keys, tokenizer: as for the Lightning :class:`~xattn_lightning.XAttnSaliencyMonitor`.

        The other arguments, the reading options (keyword-only), are the fields of
        :class:`~xattn_lightning.monitoring.MonitorOptions`, documented there with their defaults; the Lightning
        monitor takes the same. ``callback.config`` holds them checked (a
        :class:`~xattn_lightning.monitoring.MonitorConfig`), read when the callback is made.

    Example:
        >>> cb = XAttnSaliencyCallback(num_probes=4, n_masks=64)
        >>> cb.config.reading.saliency.n_masks
        64
    """

    trainer: Any = field(default=None, repr=False)
    every_n_steps: int | None = None
    probes: Any = field(default=None, repr=False)
    model_fn: Callable[[Any], Any] | None = field(default=None, repr=False)
    batch_fn: Callable[[Any], Any] | str | None = field(default=None, repr=False)
    batch_keys: dict[str, str] | None = None
    tokenizer: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = self.every_n_steps
        if n is not None and (not isinstance(n, int) or n < 1):
            raise XAttnError(f"Expected every_n_steps to be a positive int or None but got {n!r}.")
        check_probes_source(self.probes)
        self.instrument = Instrument(
            MonitorConfig.of(self),
            self.probes,
            Messages(self.on_error, name="XAttnSaliencyCallback"),
            batch_fn=self.batch_fn,
            batch_keys=self.batch_keys,
        )
        self._resume_checked = False

    # ------------------------------------------------------------------ state in the Trainer's checkpoints
    def state(self) -> dict[str, Any]:
        """What a resumed run needs (probe ids, history and baseline, the fixed mask count, the heads), saved by
        the Trainer in each checkpoint's ``trainer_state.json``. The callback restores it itself when training
        resumes from a checkpoint: leave ``restore_callback_states_from_checkpoint`` off (on, the Trainer would
        replace the callback by one built from no arguments)."""
        return {"args": {}, "attributes": {"xattn_state": self.instrument.state_dict()}}

    def _restore(self, state: TrainerState) -> None:
        """Once per ``train()``, after the Trainer loaded a checkpoint's state: take this callback's back."""
        if self._resume_checked:
            return
        self._resume_checked = True
        stored: Any = state.stateful_callbacks  # a dict once the Trainer built or loaded it
        saved = stored.get(type(self).__name__) if isinstance(stored, dict) else None
        saved = saved[-1] if isinstance(saved, list) and saved else saved
        mine = saved.get("attributes", {}).get("xattn_state") if isinstance(saved, dict) else None
        if mine and mine.get("probe_ids") and mine != self.instrument.state_dict():
            self.instrument.load_state_dict(mine)
            self.instrument.messages.info(
                f"resumed its state from the checkpoint: probes {mine['probe_ids']}, {len(mine.get('history', []))} "
                "readings, the mask count and baseline kept."
            )

    # ------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the overhead budget; say now what cannot work."""
        with self.instrument.messages.guard("on_train_begin"):
            self._resume_checked = False
            self.instrument.reader.budget.start()
            self.instrument.forget_adapter()
            if self.trainer is None:
                self.instrument.messages.warn_once(
                    "no-trainer",
                    "no trainer= given: readings go to trainer.state.log_history and the W&B run only, not to the "
                    "other report_to integrations. Add it with trainer.add_callback(XAttnSaliencyCallback(trainer, ...)).",
                )
            adapter = self._adapter(kwargs)
            self.instrument.check_adapter(adapter, type(kwargs.get("model")).__name__, guessed=self.model_fn is None)
            if self.trainer is None and self.instrument.collector.probe_set.source is None:
                # the eval set arrives with the first evaluation: read one training item now, collated alone
                self.instrument.collector.check_before_training(adapter, lambda: _first_collated(kwargs.get("train_dataloader")))
                return
            try:
                self._probe_source(kwargs)
            except XAttnError as err:  # said now, before the first step
                self.instrument.messages.warn_once("probes", f"nothing will be read: {err}")
                return
            if self.instrument.collector.probe_set.source is not None:
                self.instrument.collector.check_before_training(adapter)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Take the callback's state back from the checkpoint training resumed from (the Trainer loads it after
        ``on_train_begin``)."""
        with self.instrument.messages.guard("on_step_begin"):
            self._restore(state)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Read after each evaluation (without ``every_n_steps``)."""
        if self.every_n_steps is None:
            with self.instrument.messages.guard("on_evaluate"):
                self._scheduled(args, state, kwargs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Read after each epoch when the Trainer never evaluates (``eval_strategy="no"``, no ``every_n_steps``)."""
        if self.every_n_steps is None and getattr(args, "eval_strategy", None) == "no":
            with self.instrument.messages.guard("on_epoch_end"):
                self._scheduled(args, state, kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Read every ``every_n_steps`` optimizer steps."""
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            with self.instrument.messages.guard("on_step_end"):
                self._scheduled(args, state, kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Export the chosen alignment heads (``export_alignment_heads=True``); say what the readings cost and,
        when due readings were not taken, how many and why."""
        with self.instrument.messages.guard("on_train_end"):
            self.instrument.say_run_end()
            if self.config.export_alignment_heads:
                self.instrument.export_alignment_heads(self._adapter(kwargs))

    # ------------------------------------------------------------------ a reading
    def _adapter(self, kwargs: dict[str, Any]) -> Adapter:
        model = kwargs.get("model")
        if model is None:
            raise XAttnError("the Trainer passed no model to its callbacks.")
        target = self.model_fn(model) if self.model_fn is not None else model
        trainer_tokenizer = getattr(self.trainer, "processing_class", None)
        return self.instrument.adapter(
            target, model, self.tokenizer, kwargs.get("processing_class") or trainer_tokenizer
        )

    def _probe_source(self, kwargs: dict[str, Any]) -> None:
        """Without ``probes=``: the first ``num_probes`` eval items (map-style or streaming), each collated alone
        by the Trainer's collator, from a fresh iterator (the same on every process, whatever the world size;
        the Trainer's own evaluation iterator is never touched)."""
        probes = self.instrument.collector.probe_set
        if probes.source is not None or probes.final:
            return
        loader = kwargs.get("eval_dataloader")
        dataset = getattr(self.trainer, "eval_dataset", None)
        collate = getattr(self.trainer, "data_collator", None)
        if dataset is None and loader is not None:
            dataset = getattr(loader, "dataset", None)
        if dataset is None and getattr(self.trainer, "train_dataset", None) is not None:  # no eval set at all
            dataset = self.trainer.train_dataset
            self.instrument.messages.info(
                f"no eval set: the probes are the first {self.config.num_probes} training items. For held-out ones "
                "pass probes=<a list of batches, a Dataset or a DataLoader> or eval_dataset= to the Trainer."
            )
        if isinstance(dataset, Mapping) and dataset:  # several eval sets: the first
            name, dataset = next(iter(dataset.items()))
            self.instrument.messages.info(f"probes are taken from the first eval set, {name!r}.")
        if loader is not None and collate is None:
            collate = getattr(loader, "collate_fn", None)
        if dataset is None or collate is None:
            raise XAttnError(
                "no eval set to take probe utterances from; pass probes=<a list of batches, a Dataset or a "
                "DataLoader> to the callback, or eval_dataset= to the Trainer."
            )
        if iter_once(dataset):
            raise XAttnError(
                f"the eval set is a one-shot iterator ({type(dataset).__name__}), which taking probes would consume; "
                "pass probes=<a list of a few batches> (e.g. probes=list(itertools.islice(trainer.get_eval_dataloader(), 2)))."
            )
        items = list(first_items(dataset, self.config.num_probes, "the eval set"))
        probes.source = [_with_item_facts(collate([item]), item) for item in items]

    def _scheduled(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        if state.global_step == self.instrument.last_step:
            return
        host = TrainerHost(self.trainer, state, args, self.instrument.messages)
        if not self.instrument.reader.within_budget(host, state.global_step, state.global_step):
            return
        start = self.clock()
        try:
            self.read(args, state, kwargs, host)
        finally:
            self.instrument.reader.budget.spent(self.clock() - start)

    def read(
        self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any], host: TrainerHost | None = None
    ) -> Summary | None:
        """Explain the probes now and log at the Trainer's step; the summary (``None`` when nothing was read)."""
        try:
            self._probe_source(kwargs)
        except XAttnError as err:
            self.instrument.messages.warn_once("probes", f"nothing will be read: {err}")
            self.instrument.reader.skip("no probe utterance could be taken", "see the warning at the start of training")
            return None
        return self.instrument.read(
            host or TrainerHost(self.trainer, state, args, self.instrument.messages),
            lambda: self._adapter(kwargs),
            step=state.global_step,
            epoch=None if state.epoch is None else int(state.epoch),
        )
