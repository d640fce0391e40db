"""``xattn_lightning.monitoring.publisher``: what a reading logs and keeps."""

from __future__ import annotations

import math

from xattn_lightning.monitoring import (
    History,
    Messages,
    MonitorConfig,
    SingleProcess,
)


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
    # 0.1 at 256 masks needs 2,304 for 0.5: more than n_masks='auto' ever reads, and the warning says so
    (floor,) = [m for m in said if "floor" in m]
    assert "about 2304 masks" in floor and "n_masks='auto' takes at most 2048, short of it" in floor
    assert publisher.history.entries[0]["step"] == 7 and publisher.head_ranking["encoder_spes"][0][:2] == (0, 0)
    assert not math.isnan(logged["xattn/encoder_spes/pearson"])


def test_the_floor_warning_says_which_count_auto_would_take():
    from helpers import scored

    from xattn_lightning.monitoring import Publisher
    from xattn_lightning.monitoring.reader import MonitorReading

    said: list[str] = []
    config = MonitorConfig(log_figures=False)
    publisher = Publisher(config, Messages("warn", warn=said.append, info=said.append), History(config.methods, 0.3))
    metric = MonitorReading(config.methods, config.metrics, 0.3)
    metric.update([scored(0.4, reliability=0.2, noise=0.01, n_masks=256, pid="a")], [])
    publisher.publish(SingleProcess(lambda s, step: None), metric, seconds=1.0, step=1)
    (floor,) = [m for m in said if "floor" in m]  # 0.2 at 256 needs 1,024 for 0.5: the rung "auto" takes
    assert "about 1024 masks" in floor and "n_masks='auto' measures this at the first reading and would take 1024" in floor
