"""``xattn_lightning.monitoring.reader``: which readings are taken and the mask count they are taken at."""

from __future__ import annotations

import torch

from xattn_lightning.monitoring import (
    Messages,
    MonitorConfig,
    SingleProcess,
)
from xattn_lightning.testing import TinyS2T


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
