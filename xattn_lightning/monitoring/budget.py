"""How often a monitor reads: the overhead budget (``max_overhead``), pure bookkeeping over a clock.

A reading that is due while the monitor has used more than its share of the training time is
skipped; a reading is never made cheaper, so every reading of a run uses the same mask count.
:class:`ReadingPlan` says what a reading will cost before its masks run, and :func:`thinned_summary`
how many readings the budget thinned at the end of a run.

Example:
    >>> t = [0.0]
    >>> budget = OverheadBudget(0.1, clock=lambda: t[0])
    >>> budget.start(); budget.allows()   # the first reading of a fit always runs
    True
    >>> t[0] = 10.0; budget.spent(5.0)    # 5 s of monitor in 10 s: 5 s of training
    >>> budget.allows(), round(budget.training_seconds(), 1)
    (False, 5.0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


class OverheadBudget:
    """The monitor's time as a share of training time.

    Args:
        max_overhead: the largest share (``None``: no budget, every due reading runs).
        clock: seconds (replaceable, e.g. by a fake clock in tests).
    """

    def __init__(self, max_overhead: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_overhead = max_overhead
        self.clock = clock
        self.start_time: float | None = None
        self.monitor_seconds = 0.0
        self.runs = 0

    def start(self) -> None:
        """Training starts (a fit): the budget counts from now."""
        self.start_time = self.clock()
        self.monitor_seconds = 0.0
        self.runs = 0

    def training_seconds(self) -> float:
        """Seconds of training since :meth:`start`, the monitor's own excluded."""
        return 0.0 if self.start_time is None else self.clock() - self.start_time - self.monitor_seconds

    def allows(self) -> bool:
        """Whether a due reading may run now on this process's clock (the first of a fit always may)."""
        if self.max_overhead is None or self.start_time is None or self.runs == 0:
            return True
        return self.monitor_seconds <= self.max_overhead * self.training_seconds()

    def spent(self, seconds: float) -> None:
        """A reading (run or failed) took ``seconds``."""
        self.runs += 1
        self.monitor_seconds += seconds


@dataclass(frozen=True)
class ReadingPlan:
    """What a reading will cost, planned from a calibration before its masks run.

    Args:
        fixed_seconds: seconds of a probe without its masks (encoding, decoding, attention), per probe.
        mask_seconds: seconds of one mask of one probe (all perturbation methods together).
        n_masks: masks per probe of every reading of the run.
        probes: probes per process (the processes read their shares side by side).
        training_seconds: training before this reading (what one schedule interval holds; 0: unknown).
        max_overhead: the budget's share (``None``: every reading runs).

    Example:
        >>> plan = ReadingPlan(0.6, 0.008, 1024, 4, training_seconds=60.0, max_overhead=0.1)
        >>> round(plan.seconds, 1), round(plan.share, 2), plan.every(), plan.probes_within()
        (35.2, 0.59, 6, 0)
    """

    fixed_seconds: float
    mask_seconds: float
    n_masks: int
    probes: int
    training_seconds: float
    max_overhead: float | None

    @property
    def seconds(self) -> float:
        """Seconds of one reading at ``n_masks``: ``probes × (fixed + n_masks × mask)``."""
        return self.probes * (self.fixed_seconds + self.n_masks * self.mask_seconds)

    @property
    def share(self) -> float:
        """A reading against the training between two readings (``nan`` when that is unknown)."""
        return self.seconds / self.training_seconds if self.training_seconds > 0 else math.nan

    def every(self) -> int:
        """How many times the training between readings keeps a reading within ``max_overhead`` (1: it fits)."""
        if self.max_overhead is None or math.isnan(self.share):
            return 1
        return max(1, math.ceil(self.share / self.max_overhead - 1e-9))

    def probes_within(self) -> int:
        """The most probes per process whose reading fits ``max_overhead`` (0: not even one)."""
        if self.max_overhead is None or math.isnan(self.share):
            return self.probes
        per_probe = self.fixed_seconds + self.n_masks * self.mask_seconds
        return int(self.max_overhead * self.training_seconds // max(per_probe, 1e-9))

    def message(self) -> str:
        """One line for the user: the cost, against the training, and what brings it within the budget."""
        head = (
            f"a reading will take about {self.seconds:.0f} s ({self.probes} probes x ({self.fixed_seconds:.2f} s + "
            f"{self.n_masks} masks x {1000 * self.mask_seconds:.1f} ms))"
        )
        if math.isnan(self.share):
            return head + "."
        head += f", {100 * self.share:.0f} % of the {self.training_seconds:.0f} s of training before this reading"
        if self.max_overhead is None:
            return head + " (max_overhead=None: every reading runs)."
        if self.every() == 1:
            return head + f": within max_overhead={self.max_overhead}."
        fewer = self.probes_within()
        options = [f"a reading every {self.every()}x as much training (every_n_epochs/every_n_steps)"]
        if fewer >= 1:
            options.insert(0, f"num_probes={fewer} per process")
        options.append("a GPU (docs/gpu.md)")
        return (
            head + f": over max_overhead={self.max_overhead}, so about one due reading in {self.every()} will run "
            f"(readings are thinned, never made noisier). To take every reading: {', or '.join(options)}."
        )


def thinned_summary(budget: OverheadBudget, skipped: int) -> str:
    """The end of a run in one line: the readings taken, their time against training, those thinned.

    >>> t = [0.0]
    >>> b = OverheadBudget(0.1, clock=lambda: t[0]); b.start(); b.spent(5.0); t[0] = 55.0
    >>> thinned_summary(b, skipped=2)
    'the monitor took 1 reading(s) in 5 s against 50 s of training (+10 %); max_overhead=0.1 thinned 2 due reading(s).'
    """
    train = budget.training_seconds()
    share = f" (+{100 * budget.monitor_seconds / train:.0f} %)" if train > 0 else ""
    thinned = (
        f"max_overhead={budget.max_overhead} thinned {skipped} due reading(s)"
        if budget.max_overhead is not None
        else "max_overhead=None: none thinned"
    )
    return (
        f"the monitor took {budget.runs} reading(s) in {budget.monitor_seconds:.0f} s against {train:.0f} s of "
        f"training{share}; {thinned}."
    )
