"""Figures: they show the numbers they are given and compute only what is missing."""

import torch

from xattn_lightning.explain import Explanation
from xattn_lightning.saliency import SaliencyResult
from xattn_lightning.viz.heatmap import comparison_heatmaps, heatmap_figure


def _explanation(seed: int = 0) -> Explanation:
    g = torch.Generator().manual_seed(seed)
    e = Explanation(
        torch.tensor([5, 6, 7]),
        ["a", "b", "c"],
        torch.rand(2, 2, 3, 6, generator=g).softmax(-1),
        2,
        torch.rand(12, 4, generator=g),
        torch.zeros(3),
        torch.tensor([1, 5, 6, 7, 2]),
    )
    e.results["encoder_spes"] = SaliencyResult(torch.rand(3, 6, generator=g), 0.0)
    return e


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_heatmap_shows_given_scores_and_computes_missing_ones():
    e = _explanation()
    given = heatmap_figure(e, ["encoder_spes"], scores={"encoder_spes": 0.123})
    assert "encoder_spes  ρ=+0.123" in _titles(given)
    computed = heatmap_figure(e, ["encoder_spes"])
    assert f"encoder_spes  ρ={e.agreement('encoder_spes'):+.3f}" in _titles(computed)
    # the attention panel and its ρ follow the selected layers/heads
    picked = heatmap_figure(e, ["encoder_spes"], layers=[1], heads=[0])
    assert "cross-attention (mean of selected heads)" in _titles(picked)
    rho = e.agreement("encoder_spes", layers=[1], heads=[0])
    assert f"encoder_spes  ρ={rho:+.3f}" in _titles(picked)


def test_comparison_heatmaps_use_each_checkpoint_scores():
    exps = {"before": _explanation(0), "after": _explanation(1)}
    fig = comparison_heatmaps(exps, ["encoder_spes"], scores={"before": {"encoder_spes": -0.5}})
    titles = _titles(fig)
    assert "encoder_spes  ρ=-0.500" in titles
    assert f"encoder_spes  ρ={exps['after'].agreement('encoder_spes'):+.3f}" in titles
