"""``xattn_lightning.monitoring.collector``: probes from a host's batches."""

from __future__ import annotations

import pytest
import torch

from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring import (
    Messages,
    ProbeCollector,
    SingleProcess,
)


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
