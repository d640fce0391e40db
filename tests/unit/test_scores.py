"""``xattn_lightning.scores``: a probe's typed numbers, made from an explanation, flattened only for tables."""

from __future__ import annotations

import torch

import xattn_lightning as xl
from xattn_lightning.scores import ProbeScores, probe_scores
from xattn_lightning.testing import TinyS2T


def _explained(methods):
    adapter = TinyS2T.adapter(TinyS2T(vocab_size=12))
    batch = {"input_features": torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))}
    (e,) = xl.explain(adapter, batch, targets=[[1, 5, 6, 7, 2]], methods=methods, n_masks=16, n_steps=2)
    return e


def test_perturbation_and_gradient_maps_score_what_each_has():
    e = _explained(("spes", "encoder_spes", "saliency"))
    s = probe_scores(e, ("spes", "encoder_spes", "saliency"), ("pearson", "kendall"), probe_id="u1", text="hi")
    assert (s.id, s.text, s.num_tokens, s.num_frames) == ("u1", "hi", 3, 16)
    masks, exact = s.methods["encoder_spes"], s.methods["saliency"]
    assert masks.n_masks == 16 and masks.reliability is not None and masks.mask_noise is not None
    assert masks.pearson_corrected is not None and sorted(masks.agreement) == ["kendall", "pearson"]
    assert exact.n_masks is None and exact.reliability is None and exact.pearson_corrected is None
    assert len(masks.grid) == 2 and len(masks.grid[0]) == 2 and len(masks.layers) == 2
    assert masks.pearson == e.agreement("encoder_spes")
    assert s.context_mixing_gap == masks.pearson - s.methods["spes"].pearson


def test_a_row_is_flat_for_tables_and_the_scores_round_trip_as_plain_data():
    import json

    e = _explained(("encoder_spes",))
    s = probe_scores(e, ("encoder_spes",), probe_id="u1", position=3)
    s.timing_errors = [0.01, 0.02]
    row = s.row()
    assert row["encoder_spes/pearson"] == s.methods["encoder_spes"].pearson and row["timestamps/errors"] == [0.01, 0.02]
    assert "encoder_spes/reliability" in row and "context_mixing_gap" not in row
    again = ProbeScores.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.position == 3
