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
    ProbeCollector,
    SingleProcess,
    check_schedule,
)
from xattn_lightning.monitoring.masks import calibrated_count
from xattn_lightning.testing import TinyS2T


def test_config_checks_once_and_carries_one_reading_config():
    c = MonitorConfig(n_masks=64, seed=2, max_seconds=3.0, saliency_options={"p_h": 0.6, "frame_rate": 50})
    saliency = c.reading.saliency
    assert (saliency.encoder_spes.n_masks, saliency.encoder_spes.seed, saliency.encoder_spes.p_h) == (64, 2, 0.6)
    assert saliency.frame_rate == 50 and saliency.encoder_spes.max_seconds is None  # a reading's budget, not a cap
    assert (c.reading.methods, c.reading.metrics, c.reading.targets) == (c.methods, c.metrics, c.targets)
    assert MonitorConfig().reading.saliency.n_masks == "auto"
    for bad, match in [
        ({"n_masks": 0}, "n_masks"),
        ({"n_masks": "many"}, "n_masks"),
        ({"num_probes": 0}, "num_probes"),
        ({"max_overhead": 0}, "max_overhead"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"saliency_options": {"n_masks": 8}}, "n_masks= itself"),
        ({"saliency_options": {"p_hh": 0.5}}, "p_hh"),
        ({"saliency_options": {"p_h": 2.0}}, "p_h"),
        ({"methods": ()}, "at least one"),
        ({"methods": "encoder_spes"}, "string"),
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


class TwoProcesses(SingleProcess):
    """A fake host of rank 0 in a world of 2 whose other process explained nothing and failed one probe."""

    world_size = 2

    def all_gather(self, obj):
        from xattn_lightning.scores import Failure

        if isinstance(obj, dict) and "failures" in obj:  # a reading's states: the other process failed p9
            other = {"probes": [], "failures": [Failure("p9", "RuntimeError: elsewhere", 9)], "failed": 1}
            return [obj, other]
        return [obj, []]


def test_a_reading_through_a_host_gathers_and_logs():
    batch = {"input_features": torch.randn(3, 16, 8), "labels": torch.tensor([[1, 5, 6, 2]] * 3), "id": ["a", "b", "c"]}
    logged: dict[str, float] = {}
    inst = Instrument(MonitorConfig(num_probes=3, n_masks=8, targets="labels", max_overhead=None, log_figures=False),
                      probes_source=[batch], messages=Messages("warn", warn=lambda m: None, info=lambda m: None))  # fmt: skip
    summary = inst.read(TwoProcesses(lambda s, step: logged.update(s)), TinyS2T.adapter(TinyS2T()), step=5)
    assert summary is not None and inst.collector.probe_set.ids == ["a", "b", "c"]
    assert logged["xattn/num_probes"] == 2.0  # this process's share (a, c) of 3 probes
    assert logged["xattn/num_failed"] == 1.0  # the other process's failure, gathered
    assert inst.publisher.history.entries[-1]["step"] == 5 and inst.last_step == 5
    assert [p.id for p in summary.probes] == ["a", "c"] and [f.id for f in summary.failures] == ["p9"]
    state = inst.state_dict()
    again = Instrument(MonitorConfig(num_probes=3, n_masks=8, targets="labels"), probes_source=[batch])
    again.load_state_dict(state)
    assert again.collector.probe_set.ids == ["a", "b", "c"] and len(again.publisher.history.entries) == 1
    assert again.publisher.history.baseline == inst.publisher.history.baseline  # typed scores round-trip


def test_the_collector_reads_batches_and_says_once_when_none_gives_probes():
    said: list[str] = []
    messages = Messages("warn", warn=said.append, info=said.append)
    collector = ProbeCollector(2, None, messages, batch_keys={"input_features": "x", "labels": "y"})
    good = {"x": torch.randn(2, 16, 8), "y": torch.tensor([[1, 5, 6, 2]] * 2)}
    collector.take_validation_batch({"z": 1}, None)  # cannot be read: one warning, the set stays open
    collector.take_validation_batch({"z": 1}, None)
    assert len(said) == 1 and "batch" in said[0] and collector.unavailable
    collector.take_validation_batch(good, None)
    assert [p.position for p in collector.probes(SingleProcess(), lambda: None)] == [0, 1]
    with pytest.raises(XAttnError, match="not both"):
        ProbeCollector(2, None, messages, batch_fn=lambda b: b, batch_keys={"labels": "y"})


def test_the_reader_thins_by_budget_and_continues_the_calibration_masks():
    from xattn_lightning.monitoring import Reader
    from xattn_lightning.reading import Probe

    t = [0.0]
    reader = Reader(MonitorConfig(targets="labels", max_overhead=0.5), Messages("warn", warn=lambda m: None,
                    info=lambda m: None), clock=lambda: t[0])  # fmt: skip
    reader.budget.start()
    t[0] = 10.0
    reader.budget.spent(9.0)  # 9 s of monitor against 1 s of training
    assert not reader.within_budget(SingleProcess(), step=4, log_step=4) and reader.skipped_steps == [4]
    assert "1 of the 2 readings" in (reader.end_summary(taken=1) or "")
    batch = {"input_features": torch.randn(1, 16, 8), "labels": torch.tensor([[1, 5, 6, 2]])}
    probe = Probe.from_batch(0, batch, "a")
    metric = reader.read(SingleProcess(), lambda: TinyS2T.adapter(TinyS2T()), [probe])
    n = reader.masks.frozen  # n_masks="auto": chosen from the first rung, the reading made at n
    assert n is not None and metric.probes[0].methods["encoder_spes"].n_masks == n
    assert reader.plan is not None and [x[1] for x in metric.drawn] == ["a"]


def test_the_publisher_logs_what_a_reading_found_and_keeps_the_history():
    from helpers import scored

    from xattn_lightning.monitoring import Publisher
    from xattn_lightning.monitoring.reader import MonitorReading
    from xattn_lightning.scores import Failure

    said: list[str] = []
    config = MonitorConfig(log_figures=False)
    publisher = Publisher(config, Messages("warn", warn=said.append, info=said.append), History(config.methods, 0.3))
    metric = MonitorReading(config.methods, config.metrics, 0.3)
    metric.update([scored(0.4, reliability=0.1, noise=0.01, n_masks=256, pid="a")], [Failure("b", "boom", 1)])
    logged: dict[str, float] = {}
    publisher.warn_failures(metric.failures)
    summary = publisher.publish(SingleProcess(lambda s, step: logged.update(s)), metric, seconds=2.0, step=7)
    assert summary is not None and logged["xattn/num_failed"] == 1.0 and logged["xattn/seconds"] == 2.0
    assert "xattn/encoder_spes/pearson_corrected" not in logged  # below the floor: said, not logged
    assert any("boom" in m for m in said) and any("floor" in m for m in said)
    assert publisher.history.entries[0]["step"] == 7 and publisher.head_ranking["encoder_spes"][0][:2] == (0, 0)
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


def test_both_hosts_take_the_options_of_one_definition_with_its_defaults():
    """Every MonitorConfig field is an explicit, typed parameter of both hosts (for LightningCLI and IDEs), with
    MonitorConfig's default; the options' page lists every one."""
    import inspect
    import typing
    from dataclasses import MISSING, fields
    from pathlib import Path

    from xattn_lightning.callbacks.monitor import XAttnSaliencyMonitor
    from xattn_lightning.integrations.transformers import XAttnSaliencyCallback

    docs = (Path(__file__).parents[2] / "docs" / "monitor.md").read_text()
    for f in fields(MonitorConfig):
        if not f.init:
            continue
        assert f"`{f.name}`" in docs, f.name
        for host in (XAttnSaliencyMonitor, XAttnSaliencyCallback):
            param = inspect.signature(host.__init__).parameters[f.name]
            default = f.default if f.default is not MISSING else None
            assert param.default == default, (host.__name__, f.name)
            hints = typing.get_type_hints(host.__init__)
            assert param.kind is param.POSITIONAL_OR_KEYWORD and f.name in hints, (host.__name__, f.name)
    cb = XAttnSaliencyCallback(num_probes=3, n_masks=64, saliency_options={"p_h": 0.5})
    mon = XAttnSaliencyMonitor(num_probes=3, n_masks=64, saliency_options={"p_h": 0.5})
    assert cb.config == mon.config and mon.config.reading.saliency.encoder_spes.p_h == 0.5
