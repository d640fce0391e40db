"""``xattn_lightning.monitoring.config``: the options, checked once, carried as one reading config; the one definition both hosts take."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring import (
    MonitorConfig,
    MonitorOptions,
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
    """MonitorOptions is the one definition of the options: both hosts inherit every field as an explicit, typed,
    keyword-only parameter (for LightningCLI and IDEs) with its default and annotation, MonitorConfig checks the
    same fields, and the options' table of docs/monitor.md lists exactly these."""
    import inspect
    import re
    import typing
    from dataclasses import fields
    from pathlib import Path

    from xattn_lightning.callbacks.monitor import XAttnSaliencyMonitor
    from xattn_lightning.integrations.transformers import XAttnSaliencyCallback

    options = fields(MonitorOptions)
    names = [f.name for f in options]
    assert [f.name for f in fields(MonitorConfig) if f.init] == names
    types = typing.get_type_hints(MonitorOptions)
    host_args = {
        XAttnSaliencyMonitor: ["every_n_epochs", "every_n_steps", "probes", "model_fn", "batch_fn", "batch_keys", "tokenizer"],
        XAttnSaliencyCallback: ["trainer", "every_n_steps", "probes", "model_fn", "batch_fn", "batch_keys", "tokenizer"],
    }
    for host, own in host_args.items():
        params = inspect.signature(host).parameters
        hints = typing.get_type_hints(host.__init__)
        assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == own, host.__name__
        assert all(params[n].default is None and n in hints for n in own), host.__name__
        for f in options:
            param = params[f.name]
            assert param.kind is param.KEYWORD_ONLY and param.default == f.default, (host.__name__, f.name)
            assert hints[f.name] == types[f.name], (host.__name__, f.name)
    docs = (Path(__file__).parents[3] / "docs" / "monitor.md").read_text()
    section = docs.split("## Its options", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    assert sorted(n for row in rows for n in re.findall(r"`(\w+)`", row)) == sorted(names)

    cb = XAttnSaliencyCallback(num_probes=3, n_masks=64, saliency_options={"p_h": 0.5})
    mon = XAttnSaliencyMonitor(num_probes=3, n_masks=64, saliency_options={"p_h": 0.5})
    assert cb.config == mon.config == MonitorConfig.of(mon) and mon.config.reading.saliency.encoder_spes.p_h == 0.5
    with pytest.raises(FrozenInstanceError):
        mon.config.n_masks = 8  # frozen, as before
