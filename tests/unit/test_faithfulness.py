import pytest
import torch
from helpers import Oracle, oracle_adapter

import xattn_lightning as xl
from xattn_lightning.errors import XAttnError
from xattn_lightning.faithfulness import faithfulness_curves, mean_auc, perturbed_features, relevance_map

REGIONS = [range(0, 4), range(4, 8), range(8, 12)]  # encoder frames 0..11 matter; 12..19 do not


@pytest.fixture(scope="module")
def oracle():
    model = Oracle(REGIONS, scale=8.0)
    adapter = oracle_adapter(model)
    batch = {"input_features": torch.randn(1, 40, 4, generator=torch.Generator().manual_seed(1)) + 2.0}
    (e,) = xl.explain(adapter, batch, targets="generate", max_new_tokens=3, methods=("encoder_spes",), n_masks=200)
    return adapter, batch, e


def test_relevance_map_shapes_and_broadcast(oracle):
    _, _, e = oracle
    for name in ("attention", "encoder_spes", "encoder_spes:pooled"):
        r = relevance_map(e, name)
        assert r.shape == e.features.shape
    att = relevance_map(e, "attention")
    assert torch.equal(att[0], att[1])  # one encoder step covers two input frames
    assert float(att[24:].abs().max()) == 0.0  # frames no token attends to get nothing
    with pytest.raises(XAttnError, match="pooled"):
        relevance_map(e, "encoder_spes:coarse")


def test_true_ranking_is_more_faithful_than_a_wrong_one(oracle):
    adapter, batch, e = oracle
    ca = torch.zeros_like(e.cross_attention)
    ca[..., 12:] = 1.0 / 8  # attends only to frames no token depends on
    wrong = xl.Explanation(**{**e.__dict__, "cross_attention": ca, "results": {}})
    fr = [i / 10 for i in range(11)]
    (good,) = faithfulness_curves(adapter, batch, [e], modes=("deletion", "insertion"), fractions=fr, max_new_tokens=3)
    (bad,) = faithfulness_curves(
        adapter, batch, [wrong], modes=("deletion", "insertion"), fractions=fr, max_new_tokens=3
    )
    d_good, d_bad = good["attention/deletion"], bad["attention/deletion"]
    assert d_good.scores[0] == 0.0 and d_bad.scores[0] == 0.0  # nothing removed: own output
    # deleting the 40 % of cells nobody attends to first leaves the output intact
    assert d_bad.scores[4] == 0.0
    assert d_good.auc > d_bad.auc + 20
    assert good["attention/insertion"].auc < bad["attention/insertion"].auc
    assert mean_auc([good], "attention/deletion") == pytest.approx(d_good.auc)


def test_encoder_saliency_ranking_also_faithful(oracle):
    adapter, batch, e = oracle
    fr = [0.0, 0.3, 0.6, 1.0]
    (c,) = faithfulness_curves(
        adapter, batch, [e], explainers=("encoder_spes", "attention"), fractions=fr, max_new_tokens=3
    )
    assert c["encoder_spes/deletion"].scores[1] > 0.0
    assert len(c["encoder_spes/deletion"].hypotheses) == len(fr)


def test_perturbation_never_touches_padding():
    x = torch.arange(12.0).view(6, 2) + 1
    order = torch.arange(8)
    out = perturbed_features(x, 4, order, 1.0, "deletion")
    assert float(out[:4].abs().sum()) == 0.0 and torch.equal(out[4:], x[4:])
    ins = perturbed_features(x, 4, order, 0.0, "insertion")
    assert float(ins[:4].abs().sum()) == 0.0 and torch.equal(ins[4:], x[4:])
    assert torch.equal(perturbed_features(x, 4, order, 1.0, "insertion"), x)


def test_bad_arguments(oracle):
    adapter, batch, e = oracle
    with pytest.raises(XAttnError, match="increasing"):
        faithfulness_curves(adapter, batch, [e], fractions=(0.5, 0.2))
    with pytest.raises(XAttnError, match="deletion"):
        faithfulness_curves(adapter, batch, [e], modes=("erase",))
    with pytest.raises(XAttnError, match="references"):
        faithfulness_curves(adapter, batch, [e], references=["a", "b"])
    with pytest.raises(XAttnError, match="spes"):
        faithfulness_curves(adapter, batch, [e], explainers=("spes",))
