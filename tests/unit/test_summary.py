"""``xattn_lightning.summary``: a reading summarised from typed probe scores: the corrected headline only
above the reliability floor, intervals, and the reduction across processes."""


import pytest

import xattn_lightning as xl
from xattn_lightning.functional import RELIABILITY_FLOOR, masks_for_reliability
from xattn_lightning.summary import summarize


def _row(pearson, reliability, noise=0.01, n=64):
    from helpers import scored

    return scored(pearson, "m", reliability, noise, n)


def test_corrected_headline_only_above_the_reliability_floor_with_intervals():
    good = summarize([_row(0.3, 0.8), _row(0.4, 0.9), _row(0.35, 0.85)], ["m"])
    s = good.scalars
    assert good.below_floor == {}
    assert s["m/pearson_corrected_ci_low"] <= s["m/pearson_corrected"] <= s["m/pearson_corrected_ci_high"]
    assert s["m/pearson_ci_low"] <= s["m/pearson"] <= s["m/pearson_ci_high"]
    assert s["m/pearson_ci_low"] < s["m/pearson_ci_high"]
    noisy = summarize([_row(0.1, 0.1), _row(0.12, 0.2)], ["m"])
    assert "m/pearson_corrected" not in noisy.scalars and "m/pearson_corrected_ci_low" not in noisy.scalars
    rel, needed = noisy.below_floor["m"]
    assert rel == pytest.approx(0.15) and needed == masks_for_reliability(64, 0.15, 0.5) > 64
    # Spearman-Brown: the predicted reliability at the suggested count is n_masks='auto''s target, well above the floor
    k = needed / 64
    assert k * rel / (1 + (k - 1) * rel) >= 0.5 - 1e-9 > RELIABILITY_FLOOR
    # one probe still gets an interval, from its mask noise
    (lo, hi) = (lambda s: (s["m/pearson_ci_low"], s["m/pearson_ci_high"]))(
        summarize([_row(0.3, 0.9)], ["m"]).scalars
    )
    assert lo < 0.3 < hi


def test_summary_is_typed_and_reduced_like_a_metric_across_processes():
    from helpers import scored

    from xattn_lightning.scores import Failure
    from xattn_lightning.summary import ReadingMetric, Summary, summarize

    probes = [scored(0.4, spearman=0.3, layers=[0.1, 0.2], grid=[[0.1, 0.5], [0.2, 0.3]], pid=f"p{i}", position=i)
              for i in range(4)]  # fmt: skip
    s = summarize(probes[:2], ("encoder_spes",), ("pearson", "spearman"))
    assert isinstance(s, Summary) and s.probes == probes[:2]
    assert s.scalars["encoder_spes/pearson"] == pytest.approx(0.4)
    assert s.head_ranking["encoder_spes"][0][:2] == (0, 1)
    # two processes' shares (each rank's probes rank::world), one gather: the same summary as one process,
    # the probes back in their order, the failures counted ("sum") and kept ("cat")
    shares = []
    for rank in range(2):
        m = ReadingMetric(("encoder_spes",))
        m.update(probes[rank::2], [Failure(f"bad{rank}", "boom", 10 + rank)])
        shares.append(m.state())
    merged = ReadingMetric(("encoder_spes",))
    merged.sync(lambda state: shares)
    whole = merged.compute()
    assert [p.id for p in whole.probes] == ["p0", "p1", "p2", "p3"] and merged.failed == 2
    assert whole.scalars == summarize(probes, ("encoder_spes",)).scalars
    assert [f.id for f in whole.failures] == ["bad0", "bad1"]
    with pytest.raises(xl.XAttnError, match="'cat' or 'sum'"):
        merged.add_state("x", 0, "max")  # type: ignore[arg-type]
