"""The readings of a run: their logged scalars, and the change of the headline since the first one.

The first reading's per-probe numbers are the baseline; each later reading logs
``{method}/pearson_corrected_delta`` (and its interval), paired over the same probes
(:func:`~xattn_lightning.summary.paired_differences`), while both readings clear the reliability floor.

Example:
    >>> from xattn_lightning.scores import MethodScores, ProbeScores
    >>> history = History(("encoder_spes",), reliability_floor=0.3)
    >>> probe = ProbeScores("a", "", "", 1, 4, {"encoder_spes": MethodScores({"pearson": 0.2}, [0.2], [[0.2]], 1.0)})
    >>> history.change_since_first([probe])  # the first: the baseline
    ({}, {})
    >>> len(history.baseline)
    1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xattn_lightning.saliency import perturbation_methods
from xattn_lightning.scores import ProbeScores
from xattn_lightning.summary import paired_differences


class History:
    """The logged readings of a run (:attr:`entries`) and the :attr:`baseline` (kept in checkpoints)."""

    def __init__(self, methods: Sequence[str], reliability_floor: float) -> None:
        self.methods = tuple(methods)
        self.reliability_floor = reliability_floor
        #: one dict per reading: ``step``, ``epoch``, ``log_step`` and the logged scalars
        self.entries: list[dict[str, Any]] = []
        #: the first reading's per-probe scores
        self.baseline: list[ProbeScores] = []

    def change_since_first(self, probes: Sequence[ProbeScores]) -> tuple[dict[str, float], dict[str, str]]:
        """``{method}/pearson_corrected_delta`` with ``_ci_low``/``_ci_high`` since the first reading, and
        ``{method: why}`` for the methods whose change cannot be given; the first reading becomes the
        baseline and gives nothing."""
        methods = perturbation_methods(self.methods)
        if not self.baseline:
            self.baseline = list(probes)
            return {}, {}
        out: dict[str, float] = {}
        missing: dict[str, str] = {}
        for m in methods:
            d = paired_differences(self.baseline, probes, m, self.reliability_floor)["pearson_corrected"]
            if d.comparable:
                key = f"{m}/pearson_corrected_delta"
                out.update({key: d.value, f"{key}_ci_low": d.ci_low, f"{key}_ci_high": d.ci_high})
            else:
                missing[m] = d.reason
        return out, missing
