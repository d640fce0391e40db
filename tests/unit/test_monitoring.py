"""The host-independent parts of the monitor (``xattn_lightning.monitoring``), each alone: the options, the warning
policy, the overhead budget, the mask count, the history, and one reading through a fake host."""

from __future__ import annotations

import math

import pytest
import torch

from xattn_lightning.errors import XAttnError
from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.monitoring import (
    History,
    Instrument,
    MaskCount,
    Messages,
    MonitorConfig,
    OverheadBudget,
    SingleProcess,
    check_schedule,
)
from xattn_lightning.monitoring.masks import calibrated_count
from xattn_lightning.testing import TinyS2T


def test_config_checks_once_and_merges_the_options():
    c = MonitorConfig(n_masks=64, seed=2, max_seconds=3.0, saliency_options={"p_h": 0.6})
    assert c.method_options == {"p_h": 0.6, "n_masks": 64, "seed": 2, "max_seconds": 3.0}
    assert c.frame_rate is None and MonitorConfig(saliency_options={"frame_rate": 50}).frame_rate == 50.0
    flat = MonitorConfig.from_flat({"n_masks": 32, "p_h": 0.5}, num_probes=2)
    assert (flat.n_masks, flat.saliency_options, flat.num_probes) == (32, {"p_h": 0.5}, 2)
    for bad, match in [
        ({"n_masks": 0}, "n_masks"),
        ({"n_masks": "many"}, "n_masks"),
        ({"num_probes": 0}, "num_probes"),
        ({"max_overhead": 0}, "max_overhead"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"saliency_options": {"n_masks": 8}}, "n_masks= itself"),
        ({"saliency_options": {"p_hh": 0.5}}, "p_hh"),
        ({"methods": ()}, "at least one"),
        ({"layers": "lats"}, "lats"),
    ]:
        with pytest.raises(XAttnError, match=match):
            MonitorConfig(**bad)
    assert check_schedule(None, None) == 1
    with pytest.raises(XAttnError, match="exactly one"):
        check_schedule(1, 1)
    with pytest.raises(XAttnError, match="every_n_steps"):
        check_schedule(None, True)


def test_messages_say_each_thing_once_and_raise_when_asked():
    said: list[str] = []
    m = Messages("warn", warn=said.append, info=said.append)
    m.warn_once("k", "first")
    m.warn_once("k", "again")
    m.report(ValueError("x"), "reading")
    m.report(ValueError("x"), "reading")
    assert said == ["XAttnSaliencyMonitor: first", said[1]] and "reading failed and was skipped" in said[1]
    strict = Messages("raise", warn=said.append, info=said.append)
    with pytest.raises(ValueError, match="boom"), strict.guard("on_fit_start"):
        raise ValueError("boom")
    with pytest.raises(XAttnError, match="told"):
        strict.warn_once("k", "told")


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


def test_mask_count_fixes_one_count_for_the_run():
    m = MaskCount(("encoder_spes", "saliency"), {"n_masks": "auto", "seed": 0})
    assert m.auto_pending() and m.options()["n_masks"] == MASK_LADDER[0]
    rows = [{"encoder_spes/reliability": 0.2}, {"encoder_spes/reliability": 0.4}]
    n = m.choose(rows, MASK_LADDER[0])
    assert n == choose_n_masks(MASK_LADDER[0], 0.3) and m.frozen == n and not m.auto_pending()
    assert m.options()["n_masks"] == n
    assert "n_masks" not in MaskCount(("saliency",), {"n_masks": 64}).options()  # no mask method, no count
    timed = MaskCount(("encoder_spes",), {"n_masks": 512, "max_seconds": 4.0})
    assert timed.needs_calibration() and "max_seconds" not in timed.options() and timed.upper() == 512
    assert calibrated_count(1.0, 0.8, 10.0, 2, upper=32) == 32  # never above the user's count
    assert calibrated_count(1.0, 0.8, 0.1, 2, upper=4096) == 8  # never below one batch


def test_history_measures_the_change_from_the_first_reading():
    h = History(("encoder_spes",), reliability_floor=0.3)
    first = [{"id": f"p{i}", "encoder_spes/pearson": 0.3, "encoder_spes/pearson_corrected": 0.5,
              "encoder_spes/reliability": 0.6, "encoder_spes/mask_noise": 0.01} for i in range(4)]  # fmt: skip
    assert h.change_since_first(first) == ({}, {}) and len(h.baseline) == 4
    later = [dict(r, **{"encoder_spes/pearson_corrected": 0.6}) for r in first]
    change, missing = h.change_since_first(later)
    assert change["encoder_spes/pearson_corrected_delta"] == pytest.approx(0.1) and not missing
    assert (
        change["encoder_spes/pearson_corrected_delta_ci_low"]
        <= 0.1
        <= change["encoder_spes/pearson_corrected_delta_ci_high"]
    )
    noisy = [dict(r, **{"encoder_spes/reliability": 0.1}) for r in first]
    change, missing = h.change_since_first(noisy)
    assert not change and "floor" in missing["encoder_spes"]


class TwoProcesses(SingleProcess):
    """A fake host of rank 0 in a world of 2 whose other process explained nothing and failed one probe."""

    world_size = 2

    def all_gather(self, obj):
        from xattn_lightning.monitoring import Share

        other = Share(errors=[("p9", "RuntimeError: elsewhere")]) if isinstance(obj, Share) else []
        return [obj, other]


def test_a_reading_through_a_host_gathers_and_logs():
    batch = {"input_features": torch.randn(3, 16, 8), "labels": torch.tensor([[1, 5, 6, 2]] * 3), "id": ["a", "b", "c"]}
    logged: dict[str, float] = {}
    inst = Instrument(MonitorConfig(num_probes=3, n_masks=8, targets="labels", max_overhead=None, log_figures=False),
                      probes_source=[batch], messages=Messages("warn", warn=lambda m: None, info=lambda m: None))  # fmt: skip
    summary = inst.read(TwoProcesses(lambda s, step: logged.update(s)), TinyS2T.adapter(TinyS2T()), step=5)
    assert summary is not None and inst.probe_set.ids == ["a", "b", "c"]
    assert logged["xattn/num_probes"] == 2.0  # this process's share (a, c) of 3 probes
    assert logged["xattn/num_failed"] == 1.0  # the other process's failure, gathered
    assert inst.history.entries[-1]["step"] == 5 and inst.last_step == 5
    state = inst.state_dict()
    again = Instrument(MonitorConfig(num_probes=3, n_masks=8, targets="labels"), probes_source=[batch])
    again.load_state_dict(state)
    assert again.probe_set.ids == ["a", "b", "c"] and len(again.history.entries) == 1
    assert not math.isnan(logged["xattn/encoder_spes/pearson"])


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
