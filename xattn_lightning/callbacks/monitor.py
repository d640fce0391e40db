"""``XAttnSaliencyMonitor``: attention–saliency agreement on fixed probe utterances during training.

One run of the monitor is a few named steps (:meth:`XAttnSaliencyMonitor.run`): fix the probe set
(``_probes``), find the model (``_adapter``), explain this rank's share (``_explain``), gather the
numbers across ranks (``_gather``), summarise and log (``_publish``).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from typing_extensions import override

from xattn_lightning._lightning import NAMESPACES, is_logger_class, is_overridden, namespace_of
from xattn_lightning.adapters import Adapter, adapter_for, find_tokenizer
from xattn_lightning.batches import standard_batch
from xattn_lightning.callbacks.probes import ProbeSet, split_batch
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import explain
from xattn_lightning.functional import AUTO_RELIABILITY_TARGET, MASK_LADDER, RELIABILITY_FLOOR, choose_n_masks
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec, resolve_layers
from xattn_lightning.reading import Probe, ReadingConfig, read
from xattn_lightning.saliency import perturbation_methods, validate_methods
from xattn_lightning.saliency.options import READING_DEFAULTS
from xattn_lightning.summary import (
    Summary,
    nan_mean,
    paired_differences,
    summarize,
)
from xattn_lightning.timestamps import Alignment, alignment_from, score_probes

#: the per-probe numbers of the first reading kept for ``{method}/pearson_corrected_delta``
_BASELINE_KEYS = ("pearson", "pearson_corrected", "reliability", "mask_noise")

#: cheap defaults for a training-time monitor (see README "Costs"); they live in saliency.options
MONITOR_DEFAULTS = READING_DEFAULTS
PREFIX = "xattn/"


@dataclass
class _Share:
    """A rank's part of a reading (gathered: all of it): the probes' rows, ``(probe id, cause)`` of those
    that failed, ``(probe id, explanation)`` to draw, and ``(probe id, attention to time, true words)`` of
    the probes with true word timings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    explanations: list[tuple[str, Any]] = field(default_factory=list)
    timed: list[tuple[str, Alignment, tuple]] = field(default_factory=list)


def _sharded_stream(trainer: Trainer) -> tuple[int, int]:
    """``(stride, offset)`` of this rank's validation items in the global order: Lightning's
    default ``DistributedSampler`` (no shuffling) gives rank ``r`` the items ``r, r + world, ...``."""
    from torch.utils.data import DistributedSampler

    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
            return int(sampler.num_replicas), int(sampler.rank)
    return 1, 0


def _validation_planned(trainer: Trainer, pl_module: LightningModule) -> bool:
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    try:  # whether any validation data was given (private in Lightning; assume yes if it moved)
        return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return True


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (unchanged in a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _check_arguments(
    every_n_epochs: int | None,
    every_n_steps: int | None,
    num_probes: int,
    targets: str,
    on_error: str,
    metrics: Sequence[str],
    methods: Sequence[str],
    method_options: dict[str, Any],
    probes: Any,
    max_overhead: float | None,
    layers: Any,
) -> int | None:
    """Fail on a bad monitor argument at construction, not at the first reading; returns
    ``every_n_epochs`` (1 when neither schedule is given)."""
    if every_n_epochs is not None and every_n_steps is not None:
        raise XAttnError("Pass exactly one of every_n_epochs and every_n_steps, not both.")
    if every_n_epochs is None and every_n_steps is None:
        every_n_epochs = 1
    for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise XAttnError(f"Expected {name} to be a positive int but got {v!r}.")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise XAttnError(f"Expected num_probes to be a positive int but got {num_probes!r}.")
    check_choice("targets mode", targets, ("generate", "labels"))
    check_choice("on_error mode", on_error, ("warn", "raise"))
    for m in metrics:
        check_choice("metric", m, ("pearson", "spearman", "kendall"))
    validate_methods(methods, method_options)
    if not methods:
        raise XAttnError("Expected at least one saliency method; see xl.list_methods().")
    if probes is not None and isinstance(probes, (str, bytes, Mapping)):
        raise XAttnError(
            f"Expected probes= to be a DataLoader, a Dataset or a list of batches but got a "
            f"{type(probes).__name__}; wrap a single batch in a list: probes=[batch]."
        )
    if max_overhead is not None and not max_overhead > 0:
        raise XAttnError(f"Expected max_overhead > 0 (a fraction of training time) or None, got {max_overhead!r}.")
    resolve_layers(layers, 2**16)  # a malformed spec fails now
    return every_n_epochs


def _log_step(trainer: Trainer, epoch_end: bool = False) -> int:
    """The step Lightning's own logger connector gives metrics logged at this point (so ``xattn/``
    scalars land at the step of the validation metrics they belong to)."""
    try:
        step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return trainer.global_step
    return max(step - 1, 0) if epoch_end else step


class XAttnSaliencyMonitor(Callback):
    """Tracks how far cross-attention agrees with saliency on fixed probe utterances.

    Every ``every_n_epochs`` epochs or ``every_n_steps`` optimizer steps (never in the sanity
    check), explains the probes with :func:`xattn_lightning.explain` and logs under ``xattn/``:
    agreement per method and metric (full average, per layer, best head), the context-mixing gap,
    saliency coverage and the seconds spent. With a ``WandbLogger`` it also logs per-probe
    heatmaps, a layer × head grid of ρ and a probe table.

    Where the probes come from, and so when it runs:

    - ``probes=None`` (default): the first ``num_probes`` validation utterances, after validation.
      Under DDP with Lightning's distributed sampler the ranks' shares are put back in the
      single-process order, so the probe set does not depend on the world size.
    - ``probes=`` a DataLoader, a map-style Dataset or a list of batches: no validation loop
      needed. With ``every_n_epochs`` it runs after validation when validation ran that epoch,
      else at the end of the training epoch; with ``every_n_steps`` after every that many
      optimizer steps.

    When it cannot run (no validation and no ``probes``, no model found, no probe usable) it warns
    once, naming the fix. Batches may be HF-style dicts, dicts with usual alternative keys or
    ``(features, labels)`` tuples (:func:`xattn_lightning.batches.standard_batch`); ``batch_fn``
    converts anything else.

    Args:
        every_n_epochs / every_n_steps: schedule, exactly one (default ``every_n_epochs=1``).
        num_probes: probe utterances explained each time (fixed for the run and across resumes).
        methods: saliency methods (``xl.list_methods()``).
        targets: ``"generate"`` (the model's hypothesis) or ``"labels"`` (references, teacher forcing).
        probes: probe utterances instead of validation data (see above).
        model_fn: ``model_fn(pl_module) -> nn.Module | Adapter``; default: the module itself, an
            adapter at ``.xattn_adapter``, or a supported model at ``.model`` (``xl.adapter_for``).
        batch_fn: ``batch_fn(batch) -> dict`` in the model's own format, for batch shapes that
            :func:`~xattn_lightning.batches.standard_batch` does not understand.
        tokenizer: tokenizer/processor for token labels and text; default: found on the module, its
            model or the DataModule (``.tokenizer``/``.processor``), saved beside an HF model, or
            openai-whisper's own.
        metrics: correlations to report (``pearson``, ``spearman``, ``kendall``).
        layers / heads: the aggregation behind the headline ``xattn/<method>/<metric>`` numbers, as in
            :meth:`~xattn_lightning.Explanation.agreement` (``"all"``, ``"last"``, ``"last_2"``, indices);
            per-layer and per-head numbers are always reported too. Default: all layers and heads.
        log_figures: W&B heatmaps and grids (the first ``max_figures`` probes).
        max_overhead: the monitor's time budget as a fraction of the training time (default 0.1: at most
            ~10 % on top of training). It changes only *how often* readings are taken: a reading that is
            due while the monitor has used more than this share is skipped (one warning says so), never
            made cheaper, so every reading uses the same number of masks. ``None``: never skip.
        reliability_floor: ``xattn/<method>/pearson_corrected`` (the headline) is logged only when the
            maps' split-half reliability reaches it (default :data:`~xattn_lightning.functional.RELIABILITY_FLOOR`,
            chosen in ``docs/reliability_floor.md``); below it one warning says how many masks would.
        export_alignment_heads: at the end of fit, write the heads the last reading chose for word
            timestamps (those agreeing most with saliency; ``monitor.alignment_heads``) into the
            model's ``generation_config.alignment_heads``, so ``save_pretrained`` and pipelines use them.
            When the probes carry true word timings (a ``words`` entry per utterance, as
            :func:`xattn_lightning.loading.features_batch` makes from a manifest with a ``words``
            column), each reading logs ``xattn/timestamps/mae_ms``, ``within_50ms`` and ``within_100ms``.
        on_error: ``"warn"`` (default: warn once, skip this run, keep training) or ``"raise"``.
        cache_encoder: reuse each probe's encoder output while the encoder's weights stay the same
            (a frozen encoder): the reading skips the encoder pass, the readings are unchanged
            (:class:`~xattn_lightning.encoder_cache.EncoderCache` checks the weights' version counters
            and checksums at every reading). ``monitor.encoder_cache`` counts hits and misses.
        **method_options: same names as :func:`xattn_lightning.explain` (``n_masks``, ``seed``, ``p``,
            ``p_h``, ``batch_size``, ``frame_rate``, ``scales`` ...). ``frame_rate`` (input frames per second)
            also sets the seconds axis of the figures. ``max_seconds`` here is a time budget for one
            whole reading: the mask count that fits it is calibrated once, at the first reading, then
            frozen for the run (kept in the checkpoint, so a resume keeps it; ``n_masks`` is the upper
            bound), so that readings stay comparable.

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
        targets: str = "generate",
        probes: Any = None,
        model_fn: Callable[[LightningModule], nn.Module | Adapter] | None = None,
        batch_fn: Callable[[Any], Any] | None = None,
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
        on_error: str = "warn",
        cache_encoder: bool = True,
        **method_options: Any,
    ) -> None:
        super().__init__()
        every_n_epochs = _check_arguments(
            every_n_epochs,
            every_n_steps,
            num_probes,
            targets,
            on_error,
            metrics,
            methods,
            method_options,
            probes,
            max_overhead,
            layers,
        )
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_probes = num_probes
        self.methods = tuple(methods)
        self.targets = targets
        self.probes_source = probes
        self.model_fn = model_fn
        self.batch_fn = batch_fn
        self.tokenizer = tokenizer
        self.metrics = tuple(metrics)
        self.layers = layers
        self.heads = heads
        self.log_figures = log_figures
        self.max_figures = max_figures
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.max_overhead = max_overhead
        self.reliability_floor = float(reliability_floor)
        self.export_alignment_heads = bool(export_alignment_heads)
        #: heads chosen for word timestamps at the last reading that had timed probes
        self.alignment_heads: list[list[int]] | None = None
        self.on_error = on_error
        #: encoder outputs of the probes, reused while the encoder does not change (None: off)
        self.encoder_cache: EncoderCache | None = EncoderCache() if cache_encoder else None
        self.method_options = {**MONITOR_DEFAULTS, **method_options}
        # state kept across resumes
        self._probe_set = ProbeSet(num_probes, probes)
        self._last_step = -1
        self.history: list[dict[str, Any]] = []
        #: the first reading's per-probe numbers, which ``{method}/pearson_corrected_delta`` is measured from
        self.baseline: list[dict[str, Any]] = []
        # per fit
        self._adapter_cache: tuple[int, Adapter] | None = None
        self._validated_epoch = -1
        self.clock: Callable[[], float] = time.perf_counter  # replaceable, e.g. by a fake clock in tests
        self.n_masks_frozen: int | None = None  # the calibrated mask count (with max_seconds)
        self.skipped_steps: list[int] = []  # readings skipped by max_overhead
        self._train_start: float | None = None
        self._monitor_seconds = 0.0
        self._runs_this_fit = 0
        self.head_ranking: dict[str, list[tuple[int, int, float]]] = {}
        self.last_explanations: list = []
        self.first_explanations: list = []
        self._warned: set[str] = set()
        #: the Lightning package of the trainer (set at setup): a name, so that the monitor pickles (ddp_spawn)
        self._namespace = NAMESPACES[0]

    @property
    def frame_rate(self) -> float:
        """Input frames per second: SPES segmentation and the figures' seconds axis (``frame_rate=``)."""
        from xattn_lightning.saliency import OPTIONS

        return float(self.method_options.get("frame_rate", OPTIONS["frame_rate"]))

    @property
    def probe_ids(self) -> list[str]:
        """The probes' ids, fixed at the first reading (kept in checkpoints)."""
        return self._probe_set.ids

    @probe_ids.setter
    def probe_ids(self, ids: list[str]) -> None:
        self._probe_set.ids = list(ids)

    @property
    def probe_positions(self) -> list[int]:
        """The probes' positions in the probe stream, fixed at the first reading (kept in checkpoints)."""
        return self._probe_set.positions

    @probe_positions.setter
    def probe_positions(self, positions: list[int]) -> None:
        self._probe_set.positions = list(positions)

    @property
    def _lightning(self) -> ModuleType:
        return importlib.import_module(self._namespace)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, targets=self.targets)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        with self._guard("state_dict"):
            return self._state_dict()
        return {}  # the checkpoint is saved without the monitor's state; a resume starts it afresh

    def _state_dict(self) -> dict[str, Any]:
        return {
            "probe_ids": list(self.probe_ids),
            "probe_positions": list(self.probe_positions),
            "last_step": self._last_step,
            "history": [dict(h) for h in self.history],
            "n_masks_frozen": self.n_masks_frozen,
            "alignment_heads": self.alignment_heads,
            "baseline": [dict(r) for r in self.baseline],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self._guard("load_state_dict"):
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """All or nothing: a state that does not parse leaves the monitor as it was (a fresh start)."""
        restored = (
            list(state_dict.get("probe_ids", [])),
            list(state_dict.get("probe_positions", [])),
            int(state_dict.get("last_step", -1)),
            [dict(h) for h in state_dict.get("history", [])],
            state_dict.get("n_masks_frozen"),
            state_dict.get("alignment_heads"),
            [dict(r) for r in state_dict.get("baseline", [])],
        )
        (
            self.probe_ids,
            self.probe_positions,
            self._last_step,
            self.history,
            self.n_masks_frozen,
            self.alignment_heads,
            self.baseline,
        ) = restored

    # ------------------------------------------------------------------ warnings
    def _warn_once(self, key: str, message: str, err: BaseException | None = None) -> None:
        if self.on_error == "raise":
            if err is not None:
                raise err
            raise XAttnError(message)
        if key not in self._warned:
            self._warned.add(key)
            self._lightning.utilities.rank_zero_warn(f"XAttnSaliencyMonitor: {message}")

    def _info(self, message: str) -> None:
        self._lightning.utilities.rank_zero_info(f"XAttnSaliencyMonitor: {message}")

    def _report(self, err: BaseException, where: str, key: str | None = None) -> None:
        if self.on_error == "raise":
            raise err
        key = key or f"{where}:{type(err).__name__}:{err}"
        if key not in self._warned:
            self._warned.add(key)
            self._lightning.utilities.rank_zero_warn(
                f"XAttnSaliencyMonitor: {where} failed and was skipped ({type(err).__name__}: {err}). "
                "Training continues; pass on_error='raise' to debug."
            )

    @contextmanager
    def _guard(self, hook: str) -> Iterator[None]:
        """The body of the Lightning hook ``hook``: whatever goes wrong inside is warned once per hook and
        cause, and training goes on (``on_error="raise"``: it is raised)."""
        try:
            yield
        except Exception as err:
            self._report(err, f"its {hook} hook", key=f"hook:{hook}:{type(err).__name__}")

    # ------------------------------------------------------------------ setup and fit start: say now what cannot work
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._namespace = namespace_of(trainer).__name__  # rank-zero messages go through the trainer's package
        with self._guard("setup"):
            self._setup(trainer, pl_module, stage)

    def _setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if namespace_of(pl_module) is not self._lightning:
            self._warn_once(
                "namespaces",
                f"the Trainer comes from {self._lightning.__name__} but {type(pl_module).__name__} from "
                f"{namespace_of(pl_module).__name__}; import both from one package ({' or '.join(NAMESPACES)}).",
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_fit_start"):
            self._on_fit_start(trainer, pl_module)

    def _on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._adapter_cache = None
        if getattr(trainer, "fast_dev_run", False):
            self._warn_once(
                "fast-dev-run",
                "no readings under fast_dev_run (Lightning suppresses logging there). To try the monitor quickly, "
                "run a short fit instead: Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2).",
            )
        if self.probes_source is None and not _validation_planned(trainer, pl_module):
            self._warn_once(
                "no-probes",
                "nothing will be logged: there is no validation loop (validation_step and val data) to take "
                "probe utterances from. Pass probes=<a DataLoader, Dataset or list of batches> (a few held-out "
                "utterances; training batches work too), or add a validation loop.",
            )
        try:
            adapter = self._adapter(pl_module)
        except Exception as err:
            self._warn_once(
                "no-model",
                f"nothing will be logged: no supported model was found on {type(pl_module).__name__} ({err}). "
                "Pass model_fn=lambda module: <the model or an xl.HookAdapter>.",
                err,
            )
            return
        if adapter.found_at is not None and self.model_fn is None:
            self._warn_once(
                "found-at",
                f"explaining .{adapter.found_at} ({type(adapter.model).__name__}), the only supported model found on "
                f"{type(pl_module).__name__}. If it is not the model being trained (a distillation teacher, say), pass "
                "model_fn=lambda module: <the model or an xl.HookAdapter>.",
            )
        if adapter.tokenizer is None:
            self._warn_once(
                "no-tokenizer",
                "no tokenizer found (as .tokenizer/.processor on the module, its model or the DataModule, nor saved "
                "beside the model): tables and heatmaps will show token ids. Pass tokenizer=... for text.",
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_train_start"):
            self._on_train_start(trainer, pl_module)

    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_start = self.clock()
        self._monitor_seconds = 0.0
        self._runs_this_fit = 0

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_fit_end"):
            self._on_fit_end(trainer, pl_module)

    def _on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from xattn_lightning.loggers import offline_sync_hint

        if self.export_alignment_heads:
            self._export_alignment_heads(pl_module)
        for lg in trainer.loggers:
            try:
                hint = offline_sync_hint(lg)
            except Exception:  # never fail the end of training over a hint
                hint = None
            if hint:
                self._info(f"the W&B run was logged offline; upload it with: {hint}")

    def _export_alignment_heads(self, pl_module: LightningModule) -> None:
        if not self.alignment_heads:
            self._warn_once(
                "export", "export_alignment_heads=True but no reading chose heads; the generation config is unchanged."
            )
            return
        model = self._adapter(pl_module).model
        cfg = getattr(model, "generation_config", None)
        if cfg is None:
            self._warn_once(
                "export", f"export_alignment_heads=True but {type(model).__name__} has no generation_config."
            )
            return
        cfg.alignment_heads = [list(h) for h in self.alignment_heads]
        self._info(f"wrote alignment_heads={cfg.alignment_heads} into the generation config.")

    # ------------------------------------------------------------------ probe collection from validation
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_validation_epoch_start"):
            self._on_validation_epoch_start(trainer, pl_module)

    def _on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probes_source is None:
            self._probe_set.start_pass(*(_sharded_stream(trainer) if trainer.world_size > 1 else (1, 0)))

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
        with self._guard("on_validation_batch_end"):
            self._on_validation_batch_end(trainer, pl_module, batch, dataloader_idx)

    def _on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, dataloader_idx: int
    ) -> None:
        probes = self._probe_set
        if self.probes_source is not None or probes.final or dataloader_idx != 0 or not probes.wants_more():
            return
        try:
            items = split_batch(self._to_model_batch(batch, pl_module))
        except Exception as err:  # one warning for every batch of that shape, not one per batch
            self._report(err, "taking probe utterances from the validation batches", key="probe-batches")
            return
        probes.take(items)

    def _input_key(self, pl_module: LightningModule) -> str:
        try:
            return self._adapter(pl_module).input_key
        except Exception:  # reported where the model is needed; collect under the HF name meanwhile
            return Adapter.input_key

    def _to_model_batch(self, batch: Any, pl_module: LightningModule) -> dict[str, Any]:
        input_key = self._input_key(pl_module)
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        return standard_batch(batch, input_key)

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return False
        if trainer.global_step == self._last_step:
            return False
        if self.every_n_epochs is not None:
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        step, every = trainer.global_step, int(self.every_n_steps or 1)
        if self._last_step < 0:
            return step >= every
        return step - self._last_step >= every

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_validation_epoch_end"):
            self._on_validation_epoch_end(trainer, pl_module)

    def _on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validated_epoch = trainer.current_epoch
        if self.every_n_steps is not None and self.probes_source is not None:
            return  # step schedule with own probes: runs after training steps
        if self._due(trainer):
            self._scheduled_run(trainer, pl_module, _log_step(trainer))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with self._guard("on_train_batch_end"):
            self._on_train_batch_end(trainer, pl_module)

    def _on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is None or self.probes_source is None:
            return
        if self._due(trainer) and trainer.global_step % self.every_n_steps == 0:
            self._scheduled_run(trainer, pl_module, _log_step(trainer))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._guard("on_train_epoch_end"):
            self._on_train_epoch_end(trainer, pl_module)

    def _on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None or self._validated_epoch == trainer.current_epoch or not self._due(trainer):
            return
        if self.probes_source is None:
            if "no-probes" in self._warned:  # already told at fit start
                return
            self._warn_once(
                "no-validation-run",
                f"no validation ran in epoch {trainer.current_epoch}, where a reading was due; the monitor takes its "
                "probes from validation. Pass probes=... to run without validation.",
            )
            return
        self._scheduled_run(trainer, pl_module, _log_step(trainer, epoch_end=True))

    def _scheduled_run(self, trainer: Trainer, pl_module: LightningModule, log_step: int) -> None:
        if "no-model" in self._warned and trainer.world_size == 1:  # told at fit start (under DDP every rank
            try:  # takes part, so that no collective waits for a rank that skipped; failures are gathered)
                self._adapter(pl_module)
            except Exception:
                return
        if not self._within_budget(trainer, log_step):
            return
        start = self.clock()
        try:
            self.run(trainer, pl_module, log_step=log_step)
        finally:
            self._runs_this_fit += 1
            self._monitor_seconds += self.clock() - start

    def _within_budget(self, trainer: Trainer, log_step: int) -> bool:
        """``max_overhead``: skip a due reading while the monitor has used more than its share of the
        training time (the first reading of a fit always runs). Decides how often, never how."""
        if self.max_overhead is None or self._train_start is None or self._runs_this_fit == 0:
            return True
        training = self.clock() - self._train_start - self._monitor_seconds
        # rank 0's clock decides for all ranks: a reading skipped on some ranks only would deadlock
        if _broadcast_int(int(self._monitor_seconds <= self.max_overhead * training)):
            return True
        self.skipped_steps.append(trainer.global_step)
        self._warn_once(
            "overhead",
            f"skipping the reading at step {log_step} (and later ones while over budget): the monitor "
            f"has used {self._monitor_seconds:.0f} s against {training:.0f} s of training, more than "
            f"max_overhead={self.max_overhead}. Readings are thinned, never made noisier; for more of them lower "
            "num_probes or n_masks, or raise max_overhead (None: never skip).",
        )
        return False

    # ------------------------------------------------------------------ one run, in named steps
    def run(self, trainer: Trainer, pl_module: LightningModule, log_step: int | None = None) -> Summary | None:
        """Explain the probes now and log at ``log_step`` (default: the trainer's global step);
        returns the summary (``None`` when skipped)."""
        start = self.clock()
        self._last_step = trainer.global_step
        adapter: Adapter | None = None
        mine: list[Probe] = []
        options: dict[str, Any] = {}
        share = _Share()
        with isolate_rng():
            try:
                probes = self._probes(trainer, pl_module)
                adapter = self._adapter(pl_module)
                mine = probes[trainer.global_rank :: trainer.world_size]
                options = self._options(adapter, probes)
                share = self._explain(adapter, mine, options)
            except Exception as err:
                if self.on_error == "raise":
                    raise
                share.errors.append(("", f"{type(err).__name__}: {err}"))  # (probe id or "", cause)
        share = self._gather(trainer, share)
        if self._auto_masks_pending() and share.rows:  # n_masks="auto": the first reading chooses the count
            n = self._choose_masks(share.rows, int(options.get("n_masks", MASK_LADDER[0])))
            if n != options.get("n_masks"):  # every rank has the same rows, so the same n: all re-run
                share = _Share()
                with isolate_rng():
                    try:
                        if adapter is not None:
                            share = self._explain(adapter, mine, {**options, "n_masks": n})
                    except Exception as err:
                        if self.on_error == "raise":
                            raise
                        share.errors.append(("", f"{type(err).__name__}: {err}"))
                share = self._gather(trainer, share)
        self._warn_errors(share.errors)
        if not share.rows:
            return None
        return self._publish(trainer, share, self.clock() - start, log_step)

    def _auto_masks_pending(self) -> bool:
        return (
            self.method_options.get("n_masks") == "auto"
            and self.n_masks_frozen is None
            and bool(perturbation_methods(self.methods))
        )

    def _choose_masks(self, rows: list[dict[str, Any]], measured_at: int) -> int:
        """``n_masks="auto"``: the smallest rung of :data:`~xattn_lightning.functional.MASK_LADDER` predicted to
        bring every perturbation method's maps to :data:`~xattn_lightning.functional.AUTO_RELIABILITY_TARGET`,
        from this first reading's reliabilities; frozen for the run (kept in checkpoints)."""
        reliabilities = {
            m: nan_mean([float(r.get(f"{m}/reliability", math.nan)) for r in rows])
            for m in perturbation_methods(self.methods)
        }
        n = max(choose_n_masks(measured_at, rel) for rel in reliabilities.values())
        self.n_masks_frozen = n
        measured = ", ".join(f"{m} {rel:.2f}" for m, rel in reliabilities.items())
        self._info(
            f"n_masks='auto': the maps' split-half reliability at {measured_at} masks was {measured}; {n} masks are "
            f"predicted to reach {AUTO_RELIABILITY_TARGET}. Fixed at {n} for the rest of the run (and kept in "
            "checkpoints), so that readings stay comparable."
        )
        return n

    def _probes(self, trainer: Trainer, pl_module: LightningModule) -> list[Probe]:
        """Step 1: the fixed probe set, the same on every rank."""
        probes = self._probe_set
        if not probes.final:
            if self.probes_source is not None:
                probes.collect_source(lambda b: self._to_model_batch(b, pl_module), self._input_key(pl_module))
            elif trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                shares: list = [None] * trainer.world_size  # each rank took its shard of validation
                torch.distributed.all_gather_object(shares, probes.items)
                probes.merge(shares)
            items, few = probes.finalize()
            if few:
                self._warn_once(
                    "few", f"only {len(items)} probe utterances available (num_probes={self.num_probes}); using those."
                )
        return probes.items

    def _adapter(self, pl_module: LightningModule) -> Adapter:
        """Step 2: the model's adapter (resolved once per fit), with a tokenizer wherever one is found."""
        if self._adapter_cache is not None and self._adapter_cache[0] == id(pl_module):
            return self._adapter_cache[1]
        target = self.model_fn(pl_module) if self.model_fn is not None else pl_module
        adapter = adapter_for(target, self.tokenizer)
        if adapter.tokenizer is None:
            datamodule = getattr(getattr(pl_module, "_trainer", None), "datamodule", None)
            adapter.tokenizer = find_tokenizer(pl_module, adapter.model, datamodule) or adapter.default_tokenizer()
        self._adapter_cache = (id(pl_module), adapter)
        return adapter

    def _options(self, adapter: Adapter, probes: list[Probe]) -> dict[str, Any]:
        """The explain options of every reading: the user's, with the mask count fixed for the run."""
        options = {k: v for k, v in self.method_options.items() if k != "max_seconds"}
        budget = self.method_options.get("max_seconds")
        perturbation = perturbation_methods(self.methods)
        if budget is not None and perturbation and self.n_masks_frozen is None:
            self.n_masks_frozen = self._calibrate(adapter, probes[0], perturbation, float(budget), len(probes))
            self._info(
                f"{self.n_masks_frozen} masks per method fit max_seconds={budget}; "
                "fixed for the rest of the run."
            )
        if self.n_masks_frozen is not None:
            options["n_masks"] = self.n_masks_frozen
        elif options.get("n_masks") == "auto":
            options["n_masks"] = MASK_LADDER[0]  # the first reading measures the reliability there
        if not perturbation:
            options.pop("n_masks", None)
        return options

    def _calibrate(
        self, adapter: Adapter, probe: Probe, methods: list[str], budget: float, num_probes: int
    ) -> int:
        """Masks per method that fit ``budget`` seconds for the whole reading, from one probe's timing
        (whole batches of 8, between 8 and ``n_masks``); rank 0's count on every rank."""
        calib = 8
        options = {**self.method_options, "n_masks": calib}
        options.pop("max_seconds", None)
        t0 = self.clock()
        (e,) = explain(
            adapter,
            probe.batch,
            targets=self.targets,
            methods=tuple(methods),
            encoder_cache=self.encoder_cache,
            **options,
        )
        total = self.clock() - t0
        mask_seconds = sum(float(e.info[m].get("seconds", 0.0)) for m in methods)
        fixed = max(total - mask_seconds, 0.0)
        per_mask = mask_seconds / calib
        per_rank = math.ceil(num_probes / _world_size())
        n = int((budget / per_rank - fixed) / max(per_mask, 1e-9))
        upper = self.method_options.get("n_masks", READING_DEFAULTS["n_masks"])
        upper = max(MASK_LADDER) if upper == "auto" else int(upper)
        n = max(calib, min(upper, n // calib * calib))
        return _broadcast_int(n)

    def _explain(self, adapter: Adapter, probes: list[Probe], options: dict[str, Any]) -> _Share:
        """Step 3: explain and score this rank's probes (:func:`xattn_lightning.reading.read`); one bad probe
        does not cost the others."""
        config = ReadingConfig(
            self.methods, self.metrics, self.layers, self.heads, self.targets, self.num_beams, self.max_new_tokens,
            options,
        )  # fmt: skip
        catch: tuple[type[BaseException], ...] = () if self.on_error == "raise" else (Exception,)
        reading = read(adapter, probes, config, self.encoder_cache, catch=catch)
        share = _Share(rows=reading.rows, errors=reading.failures)
        for r in reading.results:
            share.explanations.append((r.probe.id, r.explanation))
            if r.probe.words:
                share.timed.append((r.probe.id, alignment_from(r.explanation, frame_rate=self.frame_rate), r.probe.words))
        return share

    def _gather(self, trainer: Trainer, share: _Share) -> _Share:
        """Step 4: every rank gets all rows, errors and timed probes, and the explanations rank 0 will draw.

        All ranks take part (no collective inside rank-zero-only code)."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return share
        draw = set(self.probe_ids[: self.max_figures]) if self.log_figures else set()
        mine = _Share(share.rows, share.errors, [x for x in share.explanations if x[0] in draw], share.timed)
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
        order = {pid: i for i, pid in enumerate(self.probe_ids)}
        out = _Share()
        for part in gathered:
            out.rows += part.rows
            out.errors += part.errors
            out.explanations += part.explanations
            out.timed += part.timed
        out.rows.sort(key=lambda r: order.get(r["id"], 0))
        out.explanations.sort(key=lambda x: order.get(x[0], 0))
        out.timed.sort(key=lambda x: order.get(x[0], 0))
        return out

    def _warn_errors(self, errors: list[tuple[str, str]]) -> None:
        by_cause: dict[str, list[str]] = {}
        for pid, cause in errors:
            by_cause.setdefault(cause, []).append(pid)
        for cause, pids in by_cause.items():  # one warning per cause, naming the probes it hit
            named = [p for p in pids if p]
            where = f"explaining probes {', '.join(named)}" if named else "explaining probes"
            self._report(RuntimeError(cause), where, key=cause)

    def _publish(self, trainer: Trainer, share: _Share, seconds: float, log_step: int | None) -> Summary | None:
        """Step 5: summarise, keep the history and log (scalars everywhere, media on rank 0)."""
        rows, errors, exps = share.rows, share.errors, share.explanations
        try:
            self._time_words(rows, share.timed)
            summary = summarize(rows, self.methods, self.metrics, self.reliability_floor)
        except Exception as err:
            self._report(err, "summarizing")
            return None
        for m, (rel, needed) in summary.below_floor.items():
            more = f"; about {needed} masks (n_masks={needed}) would reach it" if needed > 0 else "; raise n_masks"
            level = f"{rel:.2f}" if rel == rel else "undefined: the two half maps do not agree, the maps are noise"
            self._warn_once(
                f"floor:{m}",
                f"xattn/{m}/pearson_corrected is not logged while the maps' split-half reliability ({level}) is "
                f"below the floor {self.reliability_floor}: the correction would mostly amplify noise{more}. The raw "
                f"xattn/{m}/pearson and its interval are logged.",
            )
        scalars = {PREFIX + k: v for k, v in summary.scalars.items() if not math.isnan(v)}
        scalars.update({PREFIX + k: v for k, v in self._change_since_first(rows).items() if not math.isnan(v)})
        scalars[PREFIX + "seconds"] = seconds
        scalars[PREFIX + "num_probes"] = float(len(rows))
        scalars[PREFIX + "num_failed"] = float(len(errors))
        self.head_ranking = summary.head_ranking
        self.last_explanations = [e for _, e in exps]
        if not self.history:
            self.first_explanations = list(self.last_explanations)
        step = trainer.global_step if log_step is None else log_step
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "log_step": step, **scalars})
        self._log_scalars(trainer, scalars, step)
        if trainer.is_global_zero:
            self._log_media(trainer, rows, exps, summary, step)
            best = {m: f"layer {r[0][0]} head {r[0][1]} (rho={r[0][2]:.3f})" for m, r in self.head_ranking.items() if r}
            self._info(f"reading at step {step}: best head {best}")
        return summary

    def _change_since_first(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """``{method}/pearson_corrected_delta`` and its interval: the change of the headline since the first
        reading of the run, paired over the same probes (:func:`~xattn_lightning.summary.paired_differences`);
        left out while either reading is below the reliability floor. The first reading is the baseline."""
        keys = [f"{m}/{k}" for m in perturbation_methods(self.methods) for k in _BASELINE_KEYS]
        if not self.baseline:
            self.baseline = [{"id": r["id"], **{k: r[k] for k in keys if k in r}} for r in rows]
            return {}
        out: dict[str, float] = {}
        for m in perturbation_methods(self.methods):
            d = paired_differences(self.baseline, rows, m, self.reliability_floor)["pearson_corrected"]
            if d.comparable:
                key = f"{m}/pearson_corrected_delta"
                out.update({key: d.value, f"{key}_ci_low": d.ci_low, f"{key}_ci_high": d.ci_high})
            elif f"delta:{m}" not in self._warned:  # the floor warning says what to do; this says what is missing
                self._warned.add(f"delta:{m}")
                self._info(f"{m}/pearson_corrected_delta is not logged while {d.reason}.")
        return out

    def _time_words(self, rows: list[dict[str, Any]], timed: list[tuple[str, Alignment, tuple]]) -> None:
        """Word timestamps of the probes that carry true word timings, from the heads that agree
        most with saliency at this reading (label-free; :func:`xattn_lightning.alignment_heads`),
        with the probe's saliency map fused in as :func:`xattn_lightning.word_timestamps` does."""
        if not timed:
            return
        self.alignment_heads, failures = score_probes(rows, timed, self.methods)
        for _, cause in failures[:1]:
            self._warn_once("timestamps", f"word timestamps of the probes could not be made: {cause}")

    # ------------------------------------------------------------------ helpers
    def _log_scalars(self, trainer: Trainer, scalars: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            try:
                logger.log_metrics(scalars, step=step)
            except Exception as err:
                self._report(err, f"logging scalars to {type(logger).__name__}")

    def _log_media(self, trainer: Trainer, rows: list, exps: list, summary: Summary, step: int) -> None:
        from xattn_lightning.loggers import log_reading_media

        wandb_loggers = [lg for lg in trainer.loggers if is_logger_class(lg, "WandbLogger")]
        if not wandb_loggers or not self.log_figures:
            return
        try:
            log_reading_media(
                wandb_loggers, rows, exps[: self.max_figures], summary, step, self.methods, self.metrics,
                frame_rate=self.frame_rate, layers=self.layers, heads=self.heads, prefix=PREFIX,
            )  # fmt: skip
        except Exception as err:
            self._report(err, "logging figures/tables to W&B")
