"""One monitored reading, host-independent: the probes, the model, the reading, the gathering, the summary
and what is logged. The Lightning callback and the Hugging Face Trainer callback are hosts over it: they
decide *when* (their hooks and schedule) and give a :class:`Host` (processes, loggers); this decides
*what*.

A reading is a few named steps (:meth:`Instrument.read`): fix the probe set, fix the mask count, read
this process's share (:func:`xattn_lightning.reading.read`), gather the shares, summarise and publish.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from xattn_lightning.adapters import Adapter, adapter_for, find_tokenizer
from xattn_lightning.batches import resolve_batch_fn, select_keys, standard_batch
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError
from xattn_lightning.explain import explain
from xattn_lightning.functional import AUTO_RELIABILITY_TARGET
from xattn_lightning.monitoring import lockstep
from xattn_lightning.monitoring.budget import OverheadBudget, ReadingPlan, thinned_summary
from xattn_lightning.monitoring.config import PREFIX, MonitorConfig
from xattn_lightning.monitoring.history import History
from xattn_lightning.monitoring.masks import CALIBRATION_MASKS, MaskCount, calibrated_count
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.monitoring.probes import ProbeSet, split_batch
from xattn_lightning.monitoring.sharded import guarded_reading
from xattn_lightning.reading import Probe, ReadingConfig
from xattn_lightning.summary import Summary, summarize
from xattn_lightning.timestamps import Alignment, alignment_from, score_probes


class Host(Protocol):
    """What a training framework gives a reading: its processes and where numbers go."""

    @property
    def world_size(self) -> int:
        """How many processes train."""
        ...

    @property
    def rank(self) -> int:
        """This process's rank (0: the one that logs media and prints)."""
        ...

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        ...

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Log scalars where the framework's own metrics go, at ``step`` (called on every process)."""
        ...

    def media_loggers(self) -> list[Any]:
        """W&B loggers for figures and tables (``log_image``/``log_table`` as Lightning's ``WandbLogger``)."""
        ...


class SingleProcess:
    """A :class:`Host` of one process that logs scalars to ``log`` (e.g. ``dict.update``)."""

    world_size = 1
    rank = 0

    def __init__(self, log: Callable[[dict[str, float], int], None] | None = None, media: Sequence[Any] = ()) -> None:
        self._log, self._media = log, list(media)

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """``obj``."""
        return obj

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Hand the scalars to ``log``."""
        if self._log is not None:
            self._log(scalars, step)

    def media_loggers(self) -> list[Any]:
        """The ``media`` given."""
        return self._media


@dataclass
class Share:
    """A process's part of a reading (gathered: all of it): the probes' rows, ``(probe id, cause)`` of those
    that failed, ``(probe id, explanation)`` to draw, and ``(probe id, attention to time, true words)`` of
    the probes with true word timings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    explanations: list[tuple[str, Any]] = field(default_factory=list)
    timed: list[tuple[str, Alignment, tuple]] = field(default_factory=list)


class _IsolatedRng:
    """A reading leaves every random stream (torch, CUDA, numpy, python) as it found it, so that training
    draws the same numbers with and without the monitor."""

    def __enter__(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.states = (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def __exit__(self, *exc: object) -> None:
        cpu, cuda, np_state, py_state = self.states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


class Instrument:
    """The state and the reading procedure of a monitor, shared by its hosts.

    Args:
        config: what to read (:class:`~xattn_lightning.monitoring.config.MonitorConfig`).
        probes_source: the ``probes=`` of the host (``None``: the host collects validation utterances).
        messages: the warning policy (the host's rank-zero printing).
        clock: seconds, for the readings' cost and the overhead budget.
        batch_fn: turns a script's batch into the model's (a callable or its import path), when the batch
            cannot be read by what it holds.
        batch_keys: or, where the model's entries sit in the script's batch (``{"input_features": "feats"}``).

    Example:
        >>> import torch
        >>> from xattn_lightning.testing import TinyS2T
        >>> batch = {"input_features": torch.randn(2, 16, 8), "labels": torch.tensor([[1, 5, 6, 7, 2], [1, 6, 5, 8, 2]])}
        >>> inst = Instrument(MonitorConfig(num_probes=2, n_masks=8, targets="labels", log_figures=False,
        ...                                 max_overhead=None), probes_source=[batch])
        >>> logged = {}
        >>> summary = inst.read(SingleProcess(lambda s, step: logged.update(s)), TinyS2T.adapter(TinyS2T()), step=0)
        >>> logged["xattn/num_probes"], "xattn/encoder_spes/pearson" in logged
        (2.0, True)
    """

    def __init__(
        self,
        config: MonitorConfig,
        probes_source: Any = None,
        messages: Messages | None = None,
        clock: Callable[[], float] | None = None,
        batch_fn: Callable[[Any], Any] | str | None = None,
        batch_keys: dict[str, str] | None = None,
    ) -> None:
        if batch_fn is not None and batch_keys:
            raise XAttnError("Pass batch_fn= or batch_keys=, not both.")
        self.batch_fn = resolve_batch_fn(batch_fn)
        self.batch_keys = dict(batch_keys) if batch_keys else None
        #: readings that were due and not taken: cause -> (count, the fix), said once at the end of the run
        self.skipped: dict[str, tuple[int, str]] = {}
        self.config = config
        self.messages = messages or Messages(config.on_error)
        self.probe_set = ProbeSet(config.num_probes, probes_source)
        self.masks = MaskCount(config.methods, config.method_options)
        self.history = History(config.methods, config.reliability_floor)
        self.budget = OverheadBudget(config.max_overhead, clock) if clock else OverheadBudget(config.max_overhead)
        #: encoder outputs of the probes, reused while the encoder does not change (None: off)
        self.encoder_cache: EncoderCache | None = EncoderCache() if config.cache_encoder else None
        #: heads chosen for word timestamps at the last reading that had timed probes
        self.alignment_heads: list[list[int]] | None = None
        self.head_ranking: dict[str, list[tuple[int, int, float]]] = {}
        self.last_explanations: list = []
        self.first_explanations: list = []
        self.skipped_steps: list[int] = []
        #: the cost the first reading planned (``n_masks="auto"``), ``None`` before
        self.plan: ReadingPlan | None = None
        self.last_step = -1
        self._adapter: tuple[int, Adapter] | None = None
        #: what the last reading's gathered copy of a sharded model cost (``gathered_gb``, ``gather_seconds``)
        self.gather_cost: dict[str, float] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of the readings' cost and of the overhead budget."""
        return self.budget.clock

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the probes, the schedule, the history and baseline, the fixed mask count, the heads."""
        return {
            "probe_ids": list(self.probe_set.ids),
            "probe_positions": list(self.probe_set.positions),
            "last_step": self.last_step,
            "history": [dict(h) for h in self.history.entries],
            "n_masks_frozen": self.masks.frozen,
            "alignment_heads": self.alignment_heads,
            "baseline": [dict(r) for r in self.history.baseline],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """All or nothing: a state that does not parse leaves the instrument as it was (a fresh start)."""
        restored = (
            list(state.get("probe_ids", [])),
            list(state.get("probe_positions", [])),
            int(state.get("last_step", -1)),
            [dict(h) for h in state.get("history", [])],
            state.get("n_masks_frozen"),
            state.get("alignment_heads"),
            [dict(r) for r in state.get("baseline", [])],
        )
        (
            self.probe_set.ids,
            self.probe_set.positions,
            self.last_step,
            self.history.entries,
            self.masks.frozen,
            self.alignment_heads,
            self.history.baseline,
        ) = restored

    # ------------------------------------------------------------------ the model
    def adapter(self, target: Any, key: object, tokenizer: object | None = None, *places: Any) -> Adapter:
        """The adapter of ``target`` (a model, a module holding one, or an adapter), resolved once per
        ``key`` (the host's module), with a tokenizer wherever one is found: ``tokenizer``, then
        ``.tokenizer``/``.processor`` on ``places``, the model, or the model's own default."""
        if self._adapter is not None and self._adapter[0] == id(key):
            return self._adapter[1]
        adapter = adapter_for(target, tokenizer)
        if adapter.tokenizer is None:
            adapter.tokenizer = find_tokenizer(*places, adapter.model) or adapter.default_tokenizer()
        self._adapter = (id(key), adapter)
        return adapter

    def forget_adapter(self) -> None:
        """Resolve the adapter again at the next use (a new fit may bring another module)."""
        self._adapter = None

    def check_adapter(self, adapter: Adapter, host_name: str, guessed: bool) -> None:
        """Say now what will make the readings less useful: a model found by guessing, no tokenizer."""
        if adapter.found_at is not None and guessed:
            self.messages.warn_once(
                "found-at",
                f"explaining .{adapter.found_at} ({type(adapter.model).__name__}), the only supported model found on "
                f"{host_name}. If it is not the model being trained (a distillation teacher, say), pass "
                "model_fn=lambda module: <the model or an xl.HookAdapter>.",
            )
        if adapter.tokenizer is None:
            self.messages.warn_once(
                "no-tokenizer",
                "no tokenizer found (as .tokenizer/.processor on the module, its model or the data, nor saved "
                "beside the model): tables and heatmaps will show token ids. Pass tokenizer=... for text.",
            )

    def export_alignment_heads(self, adapter: Adapter) -> None:
        """Write the heads the last reading chose into the model (``export_alignment_heads=True``)."""
        if not self.alignment_heads:
            self.messages.warn_once(
                "export", "export_alignment_heads=True but no reading chose heads; the model is unchanged."
            )
            return
        try:
            where = adapter.set_alignment_heads(self.alignment_heads)
        except NotImplementedError as err:
            self.messages.warn_once("export", f"export_alignment_heads=True but {err}")
            return
        self.messages.info(f"wrote alignment_heads={[list(h) for h in self.alignment_heads]} into {where}.")

    # ------------------------------------------------------------------ probes
    def model_batch(self, batch: Any, adapter: Adapter | None) -> dict[str, Any]:
        """A host's batch in the model's format: ``batch_fn`` or ``batch_keys`` first, then read by what it
        holds, given what the model takes (:meth:`Adapter.model_batch`; without a model, by the usual names)."""
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        elif self.batch_keys:
            batch = select_keys(batch, self.batch_keys)
        return adapter.model_batch(batch) if adapter is not None else standard_batch(batch)

    def take_validation_batch(self, batch: Any, adapter: Adapter | None) -> None:
        """Keep probe utterances from a validation batch while the set is short of them."""
        probes = self.probe_set
        if probes.source is not None or probes.final or not probes.wants_more():
            return
        try:
            items = split_batch(self.model_batch(batch, adapter))
        except Exception as err:  # one warning for every batch of that shape, not one per batch
            self._probe_problem(err, "the validation batches")
            return
        probes.take(items)

    def _probe_problem(self, err: Exception, where: str) -> None:
        """The one message of a probe set that cannot be made (said once, whenever it is found)."""
        if self.config.on_error == "raise":
            raise err
        self.messages.warn_once(
            "probes", f"nothing will be read: no probe utterance could be taken from {where}. {err}"
        )

    def check_before_training(self, adapter: Adapter, sample: Callable[[], Any] | None = None) -> None:
        """Before the first training step: fix the probe set of a ``probes=`` source, or read ``sample()`` (one
        validation batch, ``None`` when there is none), so that a monitor that will read nothing says so now,
        with the fix. Random streams are left as they were."""
        probes = self.probe_set
        with _IsolatedRng():
            try:
                if probes.source is not None:
                    if not probes.final:
                        probes.collect_source(lambda b: self.model_batch(b, adapter))
                        self._finalize()
                elif sample is not None and not probes.final:
                    batch = sample()
                    if batch is not None:
                        split_batch(self.model_batch(batch, adapter))
            except Exception as err:
                self._probe_problem(err, "the probes= source" if probes.source is not None else "the validation batches")

    def _finalize(self) -> list[Probe]:
        items, few = self.probe_set.finalize()
        if few:
            self.messages.warn_once(
                "few",
                f"only {len(items)} probe utterances available (num_probes={self.config.num_probes}); using those.",
            )
        return items

    def probes(self, host: Host, adapter: Callable[[], Adapter]) -> list[Probe]:
        """The fixed probe set, the same on every process (``adapter()``: the model, asked only of a ``probes=``
        source). Processes that took validation shards merge them here, first thing in a reading, before
        anything that may fail on one process only."""
        probes = self.probe_set
        if not probes.final:
            if probes.source is not None:
                found = adapter()
                probes.collect_source(lambda b: self.model_batch(b, found))
            elif host.world_size > 1:  # each process took its shard of validation
                probes.merge(host.all_gather(probes.items))
            self._finalize()
        return probes.items

    # ------------------------------------------------------------------ readings not taken
    def skip(self, cause: str, fix: str) -> None:
        """A reading that was due was not taken, for ``cause`` (counted for the end of the run)."""
        count, _ = self.skipped.get(cause, (0, fix))
        self.skipped[cause] = (count + 1, fix)

    def end_summary(self) -> str | None:
        """One message for the end of the run: how many due readings were not taken, why, and the fix."""
        if not self.skipped:
            return None
        total = sum(n for n, _ in self.skipped.values())
        parts = "; ".join(f"{n} because {cause} ({fix})" for cause, (n, fix) in self.skipped.items())
        taken = len(self.history.entries)
        return f"{total} of the {total + taken} readings due in this run were not taken: {parts}."

    # ------------------------------------------------------------------ how often
    def within_budget(self, host: Host, step: int, log_step: int) -> bool:
        """``max_overhead``: process 0's clock decides for all (a reading skipped on some processes only
        would deadlock); a skip is warned once and recorded in :attr:`skipped_steps`."""
        if host.broadcast(self.budget.allows()):
            return True
        self.skipped_steps.append(step)
        self.skip(
            f"the monitor was over max_overhead={self.config.max_overhead}",
            "lower num_probes or n_masks, read every_n_epochs=2 or more, or raise max_overhead",
        )
        self.messages.warn_once(
            "overhead",
            f"skipping the reading at step {log_step} (and later ones while over budget): the monitor has used "
            f"{self.budget.monitor_seconds:.0f} s against {self.budget.training_seconds():.0f} s of training, more "
            f"than max_overhead={self.config.max_overhead}. Readings are thinned, never made noisier; for more of "
            "them lower num_probes or n_masks, or raise max_overhead (None: never skip).",
        )
        return False

    # ------------------------------------------------------------------ one reading
    def read(
        self,
        host: Host,
        adapter: Adapter | Callable[[], Adapter],
        step: int,
        log_step: int | None = None,
        epoch: int | None = None,
    ) -> Summary | None:
        """Read the probes now (every process takes part) and log at ``log_step`` (default ``step``);
        the summary, or ``None`` when nothing could be read (said in a warning). Several processes: every
        exchange is bounded by ``reading_timeout`` and a sharded model (the host's ``root``) is read through
        an unsharded copy (:mod:`xattn_lightning.monitoring.sharded`)."""
        c = self.config
        warn = None if c.on_error == "raise" else self.messages.warn_once
        root = getattr(host, "root", None)
        with guarded_reading(host, adapter, root, c.reading_timeout, c.max_gathered_gb, warn, self.clock, c.lockstep) as guarded:
            bounded, resolve, self.gather_cost = guarded
            return self._read(bounded, resolve, step, log_step, epoch)
        return None

    def _read(
        self,
        host: Host,
        adapter: Adapter | Callable[[], Adapter],
        step: int,
        log_step: int | None,
        epoch: int | None,
    ) -> Summary | None:
        start = self.clock()
        self.last_step = step
        mine: list[Probe] = []
        options: dict[str, Any] = {}
        share = Share()
        found: Adapter | None = None
        resolve = adapter if callable(adapter) and not isinstance(adapter, Adapter) else lambda: adapter
        with _IsolatedRng():
            try:
                probes = self.probes(host, resolve)
            except Exception as err:
                where = "the probes= source" if self.probe_set.source is not None else "the validation batches"
                self._probe_problem(err, where)
                self.skip("no probe utterance could be taken", "see the warning at the start of the run")
                return None
            try:
                mine = lockstep.share_of(probes, host, resolve)  # this process's share (lockstep: it reads all)
                found = resolve()
                options = self._options(host, found, probes)
                share = self._explain(found, mine, options)
            except Exception as err:
                if self.config.on_error == "raise":
                    raise
                share.errors.append(("", f"{type(err).__name__}: {err}"))  # (probe id or "", cause)
        local = share  # this process's explanations: the maps a re-read at a higher count continues
        share = self._gather(host, share)
        if self.masks.auto_pending() and share.rows and found is not None:  # the first reading chooses the count
            measured_at = int(options.get("n_masks", 0))
            n = self.masks.choose(share.rows, measured_at)
            self._say_auto_choice(share.rows, measured_at, n)
            self._say_plan(local, len(mine), n, self.clock() - start)
            if n != measured_at:  # every process has the same rows, so the same n: all continue their maps
                share = Share()
                with _IsolatedRng():
                    try:
                        share = self._explain(found, mine, {**options, "n_masks": n}, dict(local.explanations))
                    except Exception as err:
                        if self.config.on_error == "raise":
                            raise
                        share.errors.append(("", f"{type(err).__name__}: {err}"))
                share = self._gather(host, share)
        self._warn_errors(share.errors)
        if not share.rows:
            self.skip("every probe failed", "see the warning that names the cause")
            return None
        return self._publish(host, share, self.clock() - start, step, step if log_step is None else log_step, epoch)

    def _say_plan(self, calibration: Share, probes: int, n_masks: int, seconds: float) -> None:
        """Say once, before the masks of the chosen count run, what a reading will cost against the training
        (:class:`~xattn_lightning.monitoring.budget.ReadingPlan`, from the calibration that took ``seconds``)."""
        methods = self.masks.perturbation
        exps = [e for _, e in calibration.explanations]
        masks = sum(int(e.info[m].get("n_masks", 0)) for e in exps for m in methods[:1])
        mask_seconds = sum(float(e.info[m].get("seconds", 0.0)) for e in exps for m in methods)
        if not exps or masks <= 0:
            return
        plan = ReadingPlan(
            fixed_seconds=max(seconds - mask_seconds, 0.0) / len(exps),
            mask_seconds=mask_seconds / masks,
            n_masks=n_masks,
            probes=probes,
            training_seconds=max(self.budget.training_seconds() - seconds, 0.0),  # (this reading is not training)
            max_overhead=self.config.max_overhead,
        )
        self.plan = plan
        self.messages.info(plan.message())

    def say_run_end(self) -> None:
        """One message at the end of a run: what the readings cost against training and how many the budget
        thinned (:func:`~xattn_lightning.monitoring.budget.thinned_summary`); when due readings were not taken,
        a warning that also says how many, why and the fix (:meth:`end_summary`)."""
        started = self.budget.start_time is not None and (self.budget.runs or self.skipped_steps)
        cost = thinned_summary(self.budget, len(self.skipped_steps)) if started else ""
        missed = self.end_summary()
        if missed:
            self.messages.warn_once("end-summary", f"{missed} In all, {cost}" if cost else missed)
        elif cost:
            self.messages.info(cost)

    def _say_auto_choice(self, rows: list[dict[str, Any]], measured_at: int, n: int) -> None:
        measured = ", ".join(f"{m} {rel:.2f}" for m, rel in self.masks.reliabilities(rows).items())
        self.messages.info(
            f"n_masks='auto': the maps' split-half reliability at {measured_at} masks was {measured}; {n} masks are "
            f"predicted to reach {AUTO_RELIABILITY_TARGET}. Fixed at {n} for the rest of the run (and kept in "
            "checkpoints), so that readings stay comparable."
        )

    def _options(self, host: Host, adapter: Adapter, probes: list[Probe]) -> dict[str, Any]:
        """The explain options of every reading, the mask count calibrated first when ``max_seconds`` asks."""
        if self.masks.needs_calibration():
            n = self._calibrate(adapter, probes[0], math.ceil(len(probes) / host.world_size))
            self.masks.frozen = int(host.broadcast(n))  # process 0's count on every process
            self.messages.info(
                f"{self.masks.frozen} masks per method fit max_seconds={self.masks.budget}; fixed for the rest of the run."
            )
        return self.masks.options()

    def _calibrate(self, adapter: Adapter, probe: Probe, per_process: int) -> int:
        """Masks per method that fit ``max_seconds`` for a whole reading, from one probe's timing."""
        methods = tuple(self.masks.perturbation)
        t0 = self.clock()
        (e,) = explain(
            adapter, probe.batch, targets=self.config.targets, methods=methods, encoder_cache=self.encoder_cache,
            **{**self.masks.method_options, "n_masks": CALIBRATION_MASKS},
        )  # fmt: skip
        seconds = self.clock() - t0
        mask_seconds = sum(float(e.info[m].get("seconds", 0.0)) for m in methods)
        return calibrated_count(seconds, mask_seconds, float(self.masks.budget or 0.0), per_process, self.masks.upper())

    def _explain(
        self, adapter: Adapter, probes: list[Probe], options: dict[str, Any], resume: dict[str, Any] | None = None
    ) -> Share:
        """Explain and score this process's probes (:func:`~xattn_lightning.reading.read`; ``resume``: probe id
        -> an explanation at fewer masks to continue); one bad probe does not cost the others."""
        c = self.config
        config = ReadingConfig(
            c.methods, c.metrics, c.layers, c.heads, c.targets, c.num_beams, c.max_new_tokens, options
        )
        catch: tuple[type[BaseException], ...] = () if c.on_error == "raise" else (Exception,)
        reading = lockstep.read(adapter, probes, config, self.encoder_cache, catch=catch, resume=resume)
        share = Share(rows=reading.rows, errors=reading.failures)
        for r in reading.results:
            share.explanations.append((r.probe.id, r.explanation))
            if r.probe.words:
                share.timed.append((r.probe.id, alignment_from(r.explanation, frame_rate=c.frame_rate), r.probe.words))
        return share

    def _gather(self, host: Host, share: Share) -> Share:
        """Every process gets all rows, errors and timed probes, and the explanations process 0 will draw."""
        if host.world_size <= 1:
            return share
        draw = set(self.probe_set.ids[: self.config.max_figures]) if self.config.log_figures else set()
        mine = Share(share.rows, share.errors, [x for x in share.explanations if x[0] in draw], share.timed)
        order = {pid: i for i, pid in enumerate(self.probe_set.ids)}
        out = Share()
        for part in host.all_gather(mine):
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
            self.messages.report(RuntimeError(cause), where, key=cause)

    # ------------------------------------------------------------------ summary and logging
    def _publish(
        self, host: Host, share: Share, seconds: float, step: int, log_step: int, epoch: int | None
    ) -> Summary | None:
        c = self.config
        rows, errors, exps = share.rows, share.errors, share.explanations
        try:
            self._time_words(rows, share.timed)
            summary = summarize(rows, c.methods, c.metrics, c.reliability_floor)
        except Exception as err:
            self.messages.report(err, "summarizing")
            return None
        self._warn_below_floor(summary)
        change, missing = self.history.change_since_first(rows)
        for m, why in missing.items():  # the floor warning says what to do; this says what is missing
            if f"delta:{m}" not in self.messages.warned:
                self.messages.warned.add(f"delta:{m}")
                self.messages.info(f"{m}/pearson_corrected_delta is not logged while {why}.")
        scalars = {PREFIX + k: v for k, v in {**summary.scalars, **change}.items() if not math.isnan(v)}
        scalars[PREFIX + "seconds"] = seconds
        scalars[PREFIX + "num_probes"] = float(len(rows))
        scalars[PREFIX + "num_failed"] = float(len(errors))
        self.head_ranking = summary.head_ranking
        self.last_explanations = [e for _, e in exps]
        if not self.history.entries:
            self.first_explanations = list(self.last_explanations)
        entry: dict[str, Any] = {"step": step, "epoch": epoch, "log_step": log_step}
        self.history.entries.append({k: v for k, v in entry.items() if v is not None} | scalars)
        try:
            host.log_scalars(scalars, log_step)
        except Exception as err:
            self.messages.report(err, "logging scalars")
        if host.rank == 0:
            self._log_media(host, rows, exps, summary, log_step)
            best = {m: f"layer {r[0][0]} head {r[0][1]} (rho={r[0][2]:.3f})" for m, r in self.head_ranking.items() if r}
            self.messages.info(f"reading at step {log_step}: best head {best}")
        return summary

    def _warn_below_floor(self, summary: Summary) -> None:
        floor = self.config.reliability_floor
        for m, (rel, needed) in summary.below_floor.items():
            more = (
                f"; about {needed} masks (n_masks={needed}, or n_masks='auto') are predicted to bring it to "
                f"{max(AUTO_RELIABILITY_TARGET, floor)}, safely above the floor"
                if needed > 0
                else "; raise n_masks"
            )
            level = f"{rel:.2f}" if rel == rel else "undefined: the two half maps do not agree, the maps are noise"
            self.messages.warn_once(
                f"floor:{m}",
                f"xattn/{m}/pearson_corrected is not logged while the maps' split-half reliability ({level}) is "
                f"below the floor {floor}: the correction would mostly amplify noise{more}. The raw "
                f"xattn/{m}/pearson and its interval are logged.",
            )

    def _time_words(self, rows: list[dict[str, Any]], timed: list[tuple[str, Alignment, tuple]]) -> None:
        """Word timestamps of the probes that carry true word timings, from the heads that agree most with
        saliency at this reading (label-free; :func:`xattn_lightning.timestamps.score_probes`)."""
        if not timed:
            return
        self.alignment_heads, failures = score_probes(rows, timed, self.config.methods)
        for _, cause in failures[:1]:
            self.messages.warn_once("timestamps", f"word timestamps of the probes could not be made: {cause}")

    def _log_media(self, host: Host, rows: list, exps: list, summary: Summary, step: int) -> None:
        from xattn_lightning.monitoring.media import log_reading_media  # matplotlib and W&B only when drawing

        c = self.config
        loggers = host.media_loggers()
        if not loggers or not c.log_figures:
            return
        try:
            log_reading_media(
                loggers, rows, exps[: c.max_figures], summary, step, c.methods, c.metrics,
                frame_rate=c.frame_rate, layers=c.layers, heads=c.heads, prefix=PREFIX,
            )  # fmt: skip
        except Exception as err:
            self.messages.report(err, "logging figures/tables to W&B")
