"""The mask count of every reading of a monitored run, fixed once so that readings stay comparable.

Three ways to fix it: the user's ``n_masks``; ``n_masks="auto"`` (the first reading, at the lowest rung
of :data:`~xattn_lightning.functional.MASK_LADDER`, measures the maps' split-half reliability and the
smallest rung predicted to reach :data:`~xattn_lightning.functional.AUTO_RELIABILITY_TARGET` is kept);
``max_seconds`` (one probe timed at 8 masks gives the count that fits the budget). The chosen count is
frozen for the run and kept in checkpoints (:attr:`MaskCount.frozen`).

Example:
    >>> masks = MaskCount(("encoder_spes",), {"n_masks": "auto", "seed": 0})
    >>> masks.options()["n_masks"], masks.auto_pending()
    (256, True)
    >>> masks.choose([{"encoder_spes/reliability": 0.3}], measured_at=256)
    1024
    >>> masks.options()["n_masks"], masks.auto_pending()
    (1024, False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.saliency import perturbation_methods
from xattn_lightning.saliency.options import READING_DEFAULTS
from xattn_lightning.summary import nan_mean

#: masks per method of the timing run behind ``max_seconds`` (and the step of the calibrated count)
CALIBRATION_MASKS = 8


def calibrated_count(seconds: float, mask_seconds: float, budget: float, probes_per_process: int, upper: int) -> int:
    """Masks per method that fit ``budget`` seconds for a whole reading of ``probes_per_process`` probes,
    from one probe explained at :data:`CALIBRATION_MASKS` masks in ``seconds`` (``mask_seconds`` of it
    in the mask loops): whole batches of 8, between 8 and ``upper``.

    >>> calibrated_count(seconds=1.0, mask_seconds=0.8, budget=10.0, probes_per_process=2, upper=4096)
    40
    """
    fixed = max(seconds - mask_seconds, 0.0)
    per_mask = mask_seconds / CALIBRATION_MASKS
    n = int((budget / probes_per_process - fixed) / max(per_mask, 1e-9))
    return max(CALIBRATION_MASKS, min(upper, n // CALIBRATION_MASKS * CALIBRATION_MASKS))


class MaskCount:
    """The mask count of a run's readings (see the module).

    Args:
        methods: the saliency methods read (only perturbation methods use masks).
        method_options: the user's explain options (``n_masks``, ``max_seconds``, ...).
    """

    def __init__(self, methods: Sequence[str], method_options: Mapping[str, Any]) -> None:
        self.perturbation = perturbation_methods(methods)
        self.requested = method_options.get("n_masks", READING_DEFAULTS["n_masks"])
        self.budget: float | None = method_options.get("max_seconds")
        self.method_options = {k: v for k, v in method_options.items() if k != "max_seconds"}
        #: the count fixed for the run (calibrated or chosen), kept in checkpoints; ``None``: not yet fixed
        self.frozen: int | None = None

    def upper(self) -> int:
        """The largest count ``max_seconds`` may calibrate to."""
        return max(MASK_LADDER) if self.requested == "auto" else int(self.requested)

    def needs_calibration(self) -> bool:
        """``max_seconds`` asks for a count and none is fixed yet."""
        return self.budget is not None and bool(self.perturbation) and self.frozen is None

    def auto_pending(self) -> bool:
        """``n_masks="auto"`` and no count chosen yet: the next reading measures and chooses."""
        return self.requested == "auto" and self.frozen is None and bool(self.perturbation)

    def options(self) -> dict[str, Any]:
        """The explain options of a reading: the user's, with the run's mask count."""
        options = dict(self.method_options)
        if self.frozen is not None:
            options["n_masks"] = self.frozen
        elif options.get("n_masks") == "auto":
            options["n_masks"] = MASK_LADDER[0]  # the first reading measures the reliability there
        if not self.perturbation:
            options.pop("n_masks", None)
        return options

    def reliabilities(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Each perturbation method's mean split-half reliability over the probes' ``rows``."""
        return {m: nan_mean([float(r.get(f"{m}/reliability", math.nan)) for r in rows]) for m in self.perturbation}

    def choose(self, rows: Sequence[Mapping[str, Any]], measured_at: int) -> int:
        """``n_masks="auto"``: the smallest rung predicted to bring every perturbation method's maps to the
        target, from a reading at ``measured_at`` masks; frozen for the run."""
        self.frozen = max(choose_n_masks(measured_at, rel) for rel in self.reliabilities(rows).values())
        return self.frozen
