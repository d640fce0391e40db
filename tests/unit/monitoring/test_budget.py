"""``xattn_lightning.monitoring.budget``: readings thinned by their share of training time; a reading's cost said before it is paid."""

from __future__ import annotations

import math

import pytest

from xattn_lightning.monitoring import (
    OverheadBudget,
)


def test_budget_thins_readings_by_the_share_of_training_time():
    t = [0.0]
    b = OverheadBudget(0.25, clock=lambda: t[0])
    b.start()
    assert b.allows()  # the first reading of a fit always runs
    t[0] = 10.0
    b.spent(2.0)  # 2 s of monitor in 10 s: 8 s of training, 25 % of it is 2 s
    assert b.allows() and b.training_seconds() == 8.0
    b.spent(1.0)
    assert not b.allows()
    t[0] = 30.0  # training went on
    assert b.allows()
    assert OverheadBudget(None).allows()


def test_a_reading_plan_says_its_cost_against_the_training_and_what_brings_it_within_the_budget():
    from xattn_lightning.monitoring.budget import ReadingPlan

    # 4 probes x (0.5 s + 1,024 masks x 10 ms) = 42.96 s against 60 s of training
    plan = ReadingPlan(0.5, 0.01, 1024, 4, training_seconds=60.0, max_overhead=0.1)
    assert plan.seconds == pytest.approx(42.96) and plan.share == pytest.approx(0.716)
    assert plan.every() == 8 and plan.probes_within() == 0  # 6 s of budget: not even one probe (10.74 s)
    text = plan.message()
    assert "about 43 s" in text and "72 % of the 60 s of training" in text and "one due reading in 8" in text
    assert "num_probes" not in text and "every 8x as much training" in text and "GPU" in text
    roomy = ReadingPlan(0.5, 0.01, 1024, 4, training_seconds=300.0, max_overhead=0.1)
    assert roomy.every() == 2 and roomy.probes_within() == 2  # 30 s of budget: 2 probes of 10.74 s
    assert "num_probes=2 per process, or a reading every 2x" in roomy.message()
    assert ReadingPlan(0.5, 0.01, 256, 1, 600.0, 0.1).message().endswith("within max_overhead=0.1.")
    assert "every reading runs" in ReadingPlan(0.5, 0.01, 256, 1, 10.0, None).message()
    unknown = ReadingPlan(0.5, 0.01, 256, 1, 0.0, 0.1)  # a reading outside training
    assert math.isnan(unknown.share) and unknown.every() == 1 and unknown.message().endswith("ms)).")
