"""``xattn_lightning.monitoring.core``: one reading through a host, gathered, logged, and kept in a checkpoint."""

from __future__ import annotations

import torch

from xattn_lightning.monitoring import (
    Instrument,
    Messages,
    MonitorConfig,
    SingleProcess,
)
from xattn_lightning.testing import TinyS2T


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
