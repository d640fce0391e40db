"""``xattn_lightning.monitoring.masks``: one mask count for a run."""

from __future__ import annotations

from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.monitoring import (
    MaskCount,
    MonitorConfig,
)
from xattn_lightning.monitoring.masks import calibrated_count


def test_mask_count_fixes_one_count_for_the_run():
    from helpers import scored

    reading = MonitorConfig(methods=("encoder_spes", "saliency")).reading
    m = MaskCount(reading)
    assert m.auto_pending() and m.config(reading).saliency.n_masks == MASK_LADDER[0]
    probes = [scored(0.3, reliability=0.2), scored(0.3, reliability=0.4)]
    n = m.choose_from(m.reliabilities(probes), MASK_LADDER[0])
    assert n == choose_n_masks(MASK_LADDER[0], 0.3) and m.frozen == n and not m.auto_pending()
    assert m.config(reading).saliency.n_masks == n
    gradients = MonitorConfig(methods=("saliency",), n_masks=64).reading
    assert MaskCount(gradients).config(gradients) == gradients  # no mask method, no count
    timed = MaskCount(MonitorConfig(n_masks=512).reading, budget=4.0)
    assert timed.needs_calibration() and timed.upper() == 512
    assert calibrated_count(1.0, 0.8, 10.0, 2, upper=32) == 32  # never above the user's count
    assert calibrated_count(1.0, 0.8, 0.1, 2, upper=4096) == 8  # never below one batch
