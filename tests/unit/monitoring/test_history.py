"""``xattn_lightning.monitoring.history``: the change of the headline since the first reading."""

from __future__ import annotations

import pytest

from xattn_lightning.monitoring import (
    History,
)


def test_history_measures_the_change_from_the_first_reading():
    import dataclasses

    from helpers import scored

    h = History(("encoder_spes",), reliability_floor=0.3)
    first = [scored(0.3, reliability=0.36, noise=0.01, pid=f"p{i}") for i in range(4)]  # corrected 0.5
    assert h.change_since_first(first) == ({}, {}) and len(h.baseline) == 4
    later = [scored(0.36, reliability=0.36, noise=0.01, pid=f"p{i}") for i in range(4)]  # corrected 0.6
    change, missing = h.change_since_first(later)
    assert change["encoder_spes/pearson_corrected_delta"] == pytest.approx(0.1) and not missing
    assert (
        change["encoder_spes/pearson_corrected_delta_ci_low"]
        <= 0.1
        <= change["encoder_spes/pearson_corrected_delta_ci_high"]
    )
    noisy = [dataclasses.replace(p, methods={"encoder_spes": dataclasses.replace(p.methods["encoder_spes"],
             reliability=0.1)}) for p in first]  # fmt: skip
    change, missing = h.change_since_first(noisy)
    assert not change and "floor" in missing["encoder_spes"]
