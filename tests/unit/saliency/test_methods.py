"""``xattn_lightning.saliency.methods``: every method on a model whose true regions are known (an oracle), and on Hugging Face models."""

import math

import pytest
import torch
from helpers import ORACLE_REGIONS, SALIENCY_METHODS, tiny_speech2text

import xattn_lightning as xl


@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_every_method_puts_its_mass_on_the_true_region(oracle_exp, method):
    pooled = oracle_exp.pooled(method)
    assert pooled.shape == (3, 12)
    # perturbation maps sit on a baseline (the mean KL of masks that occlude elsewhere): compare z-scores
    z = xl.functional.tokenwise_zscore(pooled)
    for i, r in enumerate(ORACLE_REGIONS):
        inside = z[i, r.start : r.stop].mean()
        outside = torch.cat([z[i, : r.start], z[i, r.stop :]]).mean()
        assert int(pooled[i].argmax()) in r, (method, i, pooled[i])
        assert inside > 1.0 and outside < 0.0, (method, i, z[i])


@pytest.mark.parametrize("method", ["spes", "encoder_spes", "saliency", "encoder_saliency"])
def test_agreement_high_for_matching_attention_and_near_zero_for_shuffled(oracle_exp, method):
    assert oracle_exp.cross_attention.shape == (1, 1, 3, 12)
    assert oracle_exp.agreement(method) > 0.85
    assert oracle_exp.agreement(method, metric="spearman") > 0.6
    g = torch.Generator().manual_seed(3)
    shuffled = []
    for _ in range(20):
        perm = torch.randperm(12, generator=g)
        ca = oracle_exp.attention()[:, perm]
        shuffled.append(xl.functional.agreement(ca, oracle_exp.pooled(method)))
    assert abs(sum(shuffled) / len(shuffled)) < 0.15


def test_gradient_input_maps_exactly_zero_outside_region(oracle_exp):
    sm = oracle_exp.saliency["saliency"]  # [I, T, F] input frames: region r covers frames 2r.start..2r.stop
    assert sm.shape == (3, 24, 4)
    assert sm[0, 8:].abs().max() == 0 and sm[0, :8].abs().max() > 0


def test_methods_on_hf_models_and_inference_mode():
    model = tiny_speech2text()
    batch = {"input_features": torch.randn(1, 40, 12)}
    with torch.inference_mode():  # as in Lightning's validation loop
        batch = {"input_features": torch.randn(1, 40, 12)}
        (e,) = xl.explain(
            model,
            batch,
            targets=[[2, 5, 6, 2]],
            methods=("saliency", "integrated_gradients", "encoder_input_x_gradient", "encoder_spes"),
            n_masks=16,
            n_steps=4,
        )
    assert e.saliency["saliency"].shape == (2, 40, 12)
    assert e.saliency["encoder_input_x_gradient"].shape == (2, 10)
    for m in e.saliency:
        assert torch.isfinite(e.saliency[m]).all() and e.saliency[m].abs().sum() > 0
        assert not math.isnan(e.agreement(m))
    assert e.layer_agreement("saliency").shape == (2,)
    assert e.agreement_grid("saliency").shape == (2, 2)
    assert e.per_token_agreement("saliency").shape == (2,)
