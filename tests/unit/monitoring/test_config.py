"""``xattn_lightning.monitoring.config``: the options, checked once, carried as one reading config; the one definition both hosts take."""

from __future__ import annotations

import pytest

from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring import (
    MonitorConfig,
    check_schedule,
)


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


def test_both_hosts_take_the_options_of_one_definition_with_its_defaults():
    """Every MonitorConfig field is an explicit, typed parameter of both hosts (for LightningCLI and IDEs), with
    MonitorConfig's default; the options' page lists every one."""
    import inspect
    import typing
    from dataclasses import MISSING, fields
    from pathlib import Path

    from xattn_lightning.callbacks.monitor import XAttnSaliencyMonitor
    from xattn_lightning.integrations.transformers import XAttnSaliencyCallback

    docs = (Path(__file__).parents[3] / "docs" / "monitor.md").read_text()
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
