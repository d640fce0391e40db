"""How often a monitor reads: the overhead budget (``max_overhead``), pure bookkeeping over a clock.

A reading that is due while the monitor has used more than its share of the training time is
skipped; a reading is never made cheaper, so every reading of a run uses the same mask count.

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

import time
from collections.abc import Callable


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
