"""What a monitor's reading publishes: its scalars (through the host, to every logger), its media (W&B),
its messages (the probes that failed, maps below the reliability floor, the best head), the word timestamps of
probes with true timings, and the run's history (:class:`Publisher`).

Example:
    >>> from xattn_lightning.monitoring.config import MonitorConfig
    >>> from xattn_lightning.monitoring.history import History
    >>> from xattn_lightning.monitoring.messages import Messages
    >>> from xattn_lightning.scores import MethodScores, ProbeScores
    >>> from xattn_lightning.monitoring.reader import MonitorReading
    >>> config = MonitorConfig(methods=("saliency",), metrics=("pearson",), log_figures=False)
    >>> publisher = Publisher(config, Messages(), History(config.methods, config.reliability_floor))
    >>> metric = MonitorReading(config.methods, config.metrics, config.reliability_floor)
    >>> metric.update([ProbeScores("a", "", "", 1, 4, {"saliency": MethodScores({"pearson": 0.5}, [0.5], [[0.5]], 1.0)})])
    >>> logged = {}
    >>> class Host: rank = 0; log_scalars = lambda self, s, step: logged.update(s); media_loggers = lambda self: []
    >>> summary = publisher.publish(Host(), metric, seconds=1.0, step=3)
    >>> logged["xattn/saliency/pearson"], publisher.history.entries[0]["step"]
    (0.5, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from xattn_lightning.functional import AUTO_RELIABILITY_TARGET, MASK_LADDER
from xattn_lightning.monitoring.config import PREFIX, MonitorConfig
from xattn_lightning.monitoring.history import History
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.monitoring.reader import MonitorReading
from xattn_lightning.scores import Failure
from xattn_lightning.summary import Summary
from xattn_lightning.timestamps import score_probes


class Publisher:
    """Logs a run's readings and keeps what they found (see the module).

    Args:
        config: the monitor's options.
        messages: the warning policy.
        history: the run's readings and the baseline of the headline's change.
    """

    def __init__(self, config: MonitorConfig, messages: Messages, history: History) -> None:
        self.config = config
        self.messages = messages
        self.history = history
        #: heads chosen for word timestamps at the last reading that had timed probes
        self.alignment_heads: list[list[int]] | None = None
        #: method -> every ``(layer, head, ρ)`` of the last reading, best first
        self.head_ranking: dict[str, list[tuple[int, int, float]]] = {}
        self.last_explanations: list[Any] = []
        self.first_explanations: list[Any] = []

    def warn_failures(self, failures: Sequence[Failure]) -> None:
        """One warning per cause, naming the probes it hit."""
        by_cause: dict[str, list[str]] = {}
        for f in failures:
            by_cause.setdefault(f.cause, []).append(f.id)
        for cause, pids in by_cause.items():
            named = [p for p in pids if p]
            where = f"explaining probes {', '.join(named)}" if named else "explaining probes"
            self.messages.report(RuntimeError(cause), where, key=cause)

    def publish(
        self, host: Any, metric: MonitorReading, seconds: float, step: int, log_step: int | None = None,
        epoch: int | None = None,
    ) -> Summary | None:  # fmt: skip
        """Summarise a synced reading and log it at ``log_step`` (default ``step``) through ``host`` (its
        ``rank``, ``log_scalars`` and ``media_loggers``); the summary, or ``None`` when it could not be made."""
        log_step = step if log_step is None else log_step
        try:
            self._time_words(metric)
            summary = metric.compute()
        except Exception as err:
            self.messages.report(err, "summarizing")
            return None
        self._warn_below_floor(summary)
        change, missing = self.history.change_since_first(summary.probes)
        for m, why in missing.items():  # the floor warning says what to do; this says what is missing
            self.messages.info_once(f"delta:{m}", f"{m}/pearson_corrected_delta is not logged while {why}.")
        scalars = {PREFIX + k: v for k, v in {**summary.scalars, **change}.items() if not math.isnan(v)}
        scalars[PREFIX + "seconds"] = seconds
        scalars[PREFIX + "num_probes"] = float(len(summary.probes))
        scalars[PREFIX + "num_failed"] = float(metric.failed)
        self.head_ranking = summary.head_ranking
        drawn = metric.drawn
        self.last_explanations = [e for _, _, e in drawn]
        if not self.history.entries:
            self.first_explanations = list(self.last_explanations)
        entry: dict[str, Any] = {"step": step, "epoch": epoch, "log_step": log_step}
        self.history.entries.append({k: v for k, v in entry.items() if v is not None} | scalars)
        try:
            host.log_scalars(scalars, log_step)
        except Exception as err:
            self.messages.report(err, "logging scalars")
        if host.rank == 0:
            self._log_media(host, summary, [(pid, e) for _, pid, e in drawn], log_step)
            best = {m: f"layer {r[0][0]} head {r[0][1]} (rho={r[0][2]:.3f})" for m, r in self.head_ranking.items() if r}
            self.messages.info(f"reading at step {log_step}: best head {best}")
        return summary

    def _warn_below_floor(self, summary: Summary) -> None:
        floor = self.config.reliability_floor
        for m, (rel, needed) in summary.below_floor.items():
            rung = next((n for n in MASK_LADDER if n >= needed), None)
            auto = (
                f"n_masks='auto' measures this at the first reading and would take {rung} here"
                if rung is not None
                else f"n_masks='auto' takes at most {max(MASK_LADDER)}, short of it"
            )
            more = (
                f"; about {needed} masks are predicted to bring it to {max(AUTO_RELIABILITY_TARGET, floor)}, safely "
                f"above the floor (n_masks={needed}; {auto})"
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

    def _time_words(self, metric: MonitorReading) -> None:
        """Word timestamps of the probes that carry true word timings, from the heads that agree most with
        saliency at this reading (label-free; :func:`xattn_lightning.timestamps.score_probes`)."""
        timed = [(pid, alignment, words) for _, pid, alignment, words in metric.timed]
        if not timed:
            return
        self.alignment_heads, failures = score_probes(metric.probes, timed, self.config.methods)
        for _, cause in failures[:1]:
            self.messages.warn_once("timestamps", f"word timestamps of the probes could not be made: {cause}")

    def _log_media(self, host: Any, summary: Summary, drawn: list[tuple[str, Any]], step: int) -> None:
        from xattn_lightning.monitoring.media import log_reading_media  # matplotlib and W&B only when drawing

        c = self.config
        loggers = host.media_loggers()
        if not loggers or not c.log_figures:
            return
        try:
            log_reading_media(
                loggers, summary, drawn[: c.max_figures], step, c.methods, c.metrics,
                layers=c.layers, heads=c.heads, prefix=PREFIX,
            )  # fmt: skip
        except Exception as err:
            self.messages.report(err, "logging figures/tables to W&B")
