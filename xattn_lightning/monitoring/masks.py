"""The mask count of every reading of a monitored run, fixed once so that readings stay comparable.

Three ways to fix it: the user's ``n_masks``; ``n_masks="auto"`` (the first reading, at the lowest rung
of :data:`~xattn_lightning.functional.MASK_LADDER`, measures the maps' split-half reliability and the
smallest rung predicted to reach :data:`~xattn_lightning.functional.AUTO_RELIABILITY_TARGET` is kept);
``max_seconds`` (one probe timed at 8 masks gives the count that fits the budget). The chosen count is
frozen for the run and kept in checkpoints (:attr:`MaskCount.frozen`).

Example:
    >>> from xattn_lightning.reading import ReadingConfig
    >>> from xattn_lightning.saliency import SaliencyOptions
    >>> reading = ReadingConfig(saliency=SaliencyOptions.from_flat(n_masks="auto"))
    >>> masks = MaskCount(reading)
    >>> masks.config(reading).saliency.n_masks, masks.auto_pending()
    (256, True)
    >>> masks.choose_from({"encoder_spes": 0.3}, measured_at=256)
    768
    >>> masks.config(reading).saliency.n_masks, masks.auto_pending()
    (768, False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.reading import ReadingConfig
from xattn_lightning.scores import ProbeScores, nan_mean

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
        reading: what a reading computes (its methods, and ``n_masks``: a number or ``"auto"``).
        budget: ``max_seconds``, seconds for a whole reading (``None``: no calibration).
    """

    def __init__(self, reading: ReadingConfig, budget: float | None = None) -> None:
        self.perturbation = reading.perturbation
        self.requested = reading.saliency.n_masks
        self.budget = budget
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

    def count(self) -> int:
        """The masks of the next reading: the fixed count, else the first rung (``"auto"`` measures there),
        else the requested number."""
        if self.frozen is not None:
            return self.frozen
        return MASK_LADDER[0] if self.requested == "auto" else int(self.requested)

    def config(self, reading: ReadingConfig) -> ReadingConfig:
        """``reading`` at the run's mask count (unchanged without perturbation methods, or at the user's count)."""
        if not self.perturbation or self.count() == reading.saliency.n_masks:
            return reading
        return reading.with_masks(self.count())

    def reliabilities(self, probes: Sequence[ProbeScores]) -> dict[str, float]:
        """Each perturbation method's mean split-half reliability over the probes."""
        out = {}
        for m in self.perturbation:
            rels = [p.methods[m].reliability for p in probes if m in p.methods]
            out[m] = nan_mean([r for r in rels if r is not None])
        return out

    def choose_from(self, reliabilities: Mapping[str, float], measured_at: int) -> int:
        """``n_masks="auto"``: the smallest rung predicted to bring every perturbation method's maps to the
        target, from their reliabilities at ``measured_at`` masks; frozen for the run."""
        self.frozen = max(choose_n_masks(measured_at, rel) for rel in reliabilities.values())
        return self.frozen
