"""Taking a monitor's readings: whether one is due within the overhead budget, the mask count (fixed by the
user, calibrated to ``max_seconds``, or chosen by ``n_masks="auto"`` from the first reading, whose masks the
reading at the chosen count continues), this process's share of the probes explained and scored
(:func:`~xattn_lightning.reading.read`) into a :class:`~xattn_lightning.summary.ReadingMetric`, reduced across
processes in one gather. What a reading logs is the :class:`~xattn_lightning.monitoring.publisher.Publisher`'s.

Example:
    >>> import torch
    >>> from xattn_lightning.monitoring.config import MonitorConfig
    >>> from xattn_lightning.monitoring.messages import Messages
    >>> from xattn_lightning.reading import Probe
    >>> from xattn_lightning.testing import TinyS2T
    >>> probe = Probe.from_batch(0, {"input_features": torch.randn(1, 16, 8), "labels": torch.tensor([[1, 5, 6, 2]])}, "a")
    >>> reader = Reader(MonitorConfig(n_masks=8, targets="labels"), Messages())
    >>> metric = reader.read(SingleProcessExchange(), lambda: TinyS2T.adapter(TinyS2T()), [probe])
    >>> [p.id for p in metric.probes], metric.probes[0].methods["encoder_spes"].n_masks
    (['a'], 8)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any

from xattn_lightning.adapters import Adapter
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.explain import Explanation, explain
from xattn_lightning.functional import AUTO_RELIABILITY_TARGET
from xattn_lightning.functional.alignment import Word
from xattn_lightning.monitoring import lockstep
from xattn_lightning.monitoring.budget import OverheadBudget, ReadingPlan
from xattn_lightning.monitoring.collector import IsolatedRng, SingleProcessExchange
from xattn_lightning.monitoring.config import MonitorConfig
from xattn_lightning.monitoring.masks import CALIBRATION_MASKS, MaskCount, calibrated_count
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.reading import Probe, ReadingConfig
from xattn_lightning.reading import read as read_alone
from xattn_lightning.scores import Failure
from xattn_lightning.summary import ReadingMetric
from xattn_lightning.timestamps import Alignment, alignment_from

__all__ = ["MonitorReading", "Reader", "SingleProcessExchange"]


class MonitorReading(ReadingMetric):
    """A monitor's reading: the probes' scores and failures (:class:`~xattn_lightning.summary.ReadingMetric`),
    and two more ``"cat"`` states that travel in the same gather: ``drawn``, ``(position, id, explanation)``
    of the probes to draw, and ``timed``, ``(position, id, alignment, true words)`` of the probes with word
    timings."""

    drawn: list[tuple[int, str, Explanation]]
    timed: list[tuple[int, str, Alignment, tuple[Word, ...]]]

    def __init__(self, methods: Sequence[str], metrics: Sequence[str], reliability_floor: float) -> None:
        super().__init__(methods, metrics, reliability_floor)
        self.add_state("drawn", [], "cat")
        self.add_state("timed", [], "cat")


class Reader:
    """How a run's readings are taken (see the module).

    Args:
        config: the monitor's options.
        messages: the warning policy.
        clock: seconds, for the readings' cost and the overhead budget.
    """

    def __init__(self, config: MonitorConfig, messages: Messages, clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.messages = messages
        self.masks = MaskCount(config.reading, config.max_seconds)
        self.budget = OverheadBudget(config.max_overhead, clock)
        #: encoder outputs of the probes, reused while the encoder does not change (None: off)
        self.encoder_cache: EncoderCache | None = EncoderCache() if config.cache_encoder else None
        #: the cost the first reading planned (``n_masks="auto"``), ``None`` before
        self.plan: ReadingPlan | None = None
        #: readings that were due and not taken: cause -> (count, the fix), said once at the end of the run
        self.skipped: dict[str, tuple[int, str]] = {}
        #: steps of the readings ``max_overhead`` thinned
        self.skipped_steps: list[int] = []

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of the readings' cost and of the overhead budget."""
        return self.budget.clock

    # ------------------------------------------------------------------ which readings are taken
    def skip(self, cause: str, fix: str) -> None:
        """A reading that was due was not taken, for ``cause`` (counted for the end of the run)."""
        count, _ = self.skipped.get(cause, (0, fix))
        self.skipped[cause] = (count + 1, fix)

    def end_summary(self, taken: int) -> str | None:
        """One message for the end of the run: how many due readings were not taken, why, and the fix."""
        if not self.skipped:
            return None
        total = sum(n for n, _ in self.skipped.values())
        parts = "; ".join(f"{n} because {cause} ({fix})" for cause, (n, fix) in self.skipped.items())
        return f"{total} of the {total + taken} readings due in this run were not taken: {parts}."

    def within_budget(self, exchange: Any, step: int, log_step: int) -> bool:
        """``max_overhead``: process 0's clock decides for all (``exchange.broadcast``: a reading skipped on
        some processes only would deadlock); a skip is warned once and recorded in :attr:`skipped_steps`."""
        if exchange.broadcast(self.budget.allows()):
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
        self, exchange: Any, adapter: Callable[[], Adapter], probes: Sequence[Probe], draw: Collection[str] = ()
    ) -> MonitorReading:
        """Explain and score this process's share of ``probes`` and reduce every process's into one
        :class:`MonitorReading` (``exchange``: the host's ``rank``, ``world_size``, ``all_gather`` and
        ``broadcast``); under several processes only the explanations of the ids in ``draw`` are gathered. A
        failure is recorded, never raised (``on_error="warn"``)."""
        start = self.clock()
        mine = lockstep.share_of(list(probes), exchange, adapter)  # this process's share (lockstep: it reads all)
        config = self.masks.config(self.config.reading)
        metric, local = self._explain(exchange, adapter, probes, mine, config)
        self._sync(exchange, metric, draw)
        if self.masks.auto_pending() and metric.probes:  # the first reading chooses the count
            measured_at = int(config.saliency.n_masks)
            reliabilities = self.masks.reliabilities(metric.probes)
            n = self.masks.choose_from(reliabilities, measured_at)
            self._say_auto_choice(reliabilities, measured_at, n)
            self._say_plan(local, len(mine), n, self.clock() - start)
            if n != measured_at:  # every process has the same reliabilities, so the same n: all continue their maps
                metric, _ = self._explain(exchange, adapter, probes, mine, self.masks.config(self.config.reading), local)
                self._sync(exchange, metric, draw)
        return metric


    def _explain(
        self,
        exchange: Any,
        adapter: Callable[[], Adapter],
        probes: Sequence[Probe],
        mine: Sequence[Probe],
        config: ReadingConfig,
        resume: Mapping[str, Explanation] | None = None,
    ) -> tuple[MonitorReading, dict[str, Explanation]]:
        """This process's probes read into a new metric, and their explanations by probe id (what a reading at
        more masks continues); one bad probe does not cost the others."""
        metric = MonitorReading(self.config.methods, self.config.metrics, self.config.reliability_floor)
        local: dict[str, Explanation] = {}
        catch: tuple[type[BaseException], ...] = () if self.config.on_error == "raise" else (Exception,)
        with IsolatedRng():
            try:
                found = adapter()
                if self.masks.needs_calibration():
                    self._calibrate(exchange, found, probes)
                    config = self.masks.config(self.config.reading)
                read_probes = partial(read_alone, found, config=config, encoder_cache=self.encoder_cache)
                reading = lockstep.read(read_probes, found.model, mine, catch=catch, resume=resume)
                metric.update(reading.scores, reading.failures)
                for r in reading.results:
                    local[r.probe.id] = r.explanation
                    metric.drawn.append((r.probe.position, r.probe.id, r.explanation))
                    if r.probe.words:
                        alignment = alignment_from(r.explanation)
                        metric.timed.append((r.probe.position, r.probe.id, alignment, r.probe.words))
            except catch as err:
                metric.update([], [Failure("", f"{type(err).__name__}: {err}")])
        return metric, local

    def _sync(self, exchange: Any, metric: MonitorReading, draw: Collection[str]) -> None:
        """Every process gets every probe's scores, failures and timings, and the explanations to draw."""
        if exchange.world_size > 1:
            metric.drawn = [x for x in metric.drawn if x[1] in draw]
        metric.sync(exchange.all_gather)

    def _calibrate(self, exchange: Any, adapter: Adapter, probes: Sequence[Probe]) -> None:
        """``max_seconds``: the masks per method that fit a whole reading, from one probe's timing on process 0,
        fixed for the run on every process."""
        config = self.config.reading.with_masks(CALIBRATION_MASKS)
        t0 = self.clock()
        (e,) = explain(
            adapter, probes[0].batch, targets=config.targets, methods=tuple(self.masks.perturbation),
            encoder_cache=self.encoder_cache, options=config.saliency,
        )  # fmt: skip
        seconds = self.clock() - t0
        mask_seconds = sum(e.results[m].seconds for m in self.masks.perturbation)
        per_process = math.ceil(len(probes) / exchange.world_size)
        n = calibrated_count(seconds, mask_seconds, float(self.masks.budget or 0.0), per_process, self.masks.upper())
        self.masks.frozen = int(exchange.broadcast(n))  # process 0's count on every process
        self.messages.info(
            f"{self.masks.frozen} masks per method fit max_seconds={self.masks.budget}; fixed for the rest of the run."
        )

    def _say_plan(self, calibration: Mapping[str, Explanation], probes: int, n_masks: int, seconds: float) -> None:
        """Say once, before the masks of the chosen count run, what a reading will cost against the training
        (:class:`~xattn_lightning.monitoring.budget.ReadingPlan`, from the calibration that took ``seconds``)."""
        methods = self.masks.perturbation
        exps = list(calibration.values())
        masks = sum(int(e.results[methods[0]].n_masks or 0) for e in exps)
        mask_seconds = sum(e.results[m].seconds for e in exps for m in methods)
        if not exps or masks <= 0:
            return
        self.plan = ReadingPlan(
            fixed_seconds=max(seconds - mask_seconds, 0.0) / len(exps),
            mask_seconds=mask_seconds / masks,
            n_masks=n_masks,
            probes=probes,
            training_seconds=max(self.budget.training_seconds() - seconds, 0.0),  # (this reading is not training)
            max_overhead=self.config.max_overhead,
        )
        terms = {e.results[m].details.get("vocabulary") for e in exps for m in methods} - {None}
        bf16 = (
            " The masks' vocabulary term is in bfloat16 (vocabulary='auto' on a CPU with AMX units: the same maps to "
            "per-token ρ ≥ 0.9999; saliency_options={'vocabulary': 'exact'} for float32)."
            if "bf16" in terms and self.config.reading.saliency.encoder_spes.vocabulary == "auto"
            else ""
        )
        self.messages.info(self.plan.message() + bf16)

    def _say_auto_choice(self, reliabilities: Mapping[str, float], measured_at: int, n: int) -> None:
        measured = ", ".join(f"{m} {rel:.2f}" for m, rel in reliabilities.items())
        self.messages.info(
            f"n_masks='auto': the maps' split-half reliability at {measured_at} masks was {measured}; {n} masks are "
            f"predicted to reach {AUTO_RELIABILITY_TARGET}. Fixed at {n} for the rest of the run (and kept in "
            "checkpoints), so that readings stay comparable."
        )
