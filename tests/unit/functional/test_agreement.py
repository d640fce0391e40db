"""``xattn_lightning.functional.agreement``: the correlations and the agreement of attention with saliency."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.functional import (
    agreement,
    agreement_grid,
    correlation,
    deletion_auc,
    per_token_correlation,
)


@pytest.mark.parametrize("metric", ["pearson", "spearman", "kendall"])
def test_correlation_matches_scipy(metric):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a, b = torch.rand(40, generator=g), torch.rand(40, generator=g)
        b = b + 0.5 * a
        ref = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}[metric](a, b)[0]
        assert correlation(a, b, metric) == pytest.approx(ref, abs=1e-5)


def test_agreement_is_paper_pearson():
    g = torch.Generator().manual_seed(0)
    ca, sm = torch.rand(5, 12, generator=g), torch.rand(5, 12, generator=g)
    z_ca = (ca - ca.mean(0)) / ca.std(0)
    z_sm = (sm - sm.mean(1, keepdim=True)) / sm.std(1, keepdim=True)
    ref = stats.pearsonr(z_ca.flatten().numpy(), z_sm.flatten().numpy())[0]
    assert agreement(ca, sm) == pytest.approx(ref, abs=1e-6)
    per_tok = per_token_correlation(ca, sm)
    assert per_tok.shape == (5,)
    assert per_tok[2] == pytest.approx(stats.pearsonr(z_ca[2].numpy(), z_sm[2].numpy())[0], abs=1e-6)


def test_agreement_grid_and_constant_nan():
    ca = torch.rand(2, 3, 4, 6)
    grid = agreement_grid(ca, torch.rand(4, 6))
    assert grid.shape == (2, 3) and torch.isfinite(grid).all()
    assert math.isnan(correlation(torch.ones(5), torch.rand(5)))
    assert math.isnan(correlation(torch.tensor([1.0, float("nan")]), torch.rand(2)))


def test_agreement_shape_errors():
    with pytest.raises(XAttnError, match="same shape"):
        agreement(torch.rand(3, 4), torch.rand(3, 5))
    with pytest.raises(XAttnError, match="pool input saliency"):
        agreement(torch.rand(3, 4), torch.rand(3, 4, 2))
    with pytest.raises(UnknownNameError, match="pearson"):
        correlation(torch.rand(3), torch.rand(3), "cosine")


def test_deletion_auc():
    assert deletion_auc([0, 0.5, 1.0], [0, 200, 100]) == pytest.approx(75.0)
    with pytest.raises(XAttnError):
        deletion_auc([0.5, 0.0], [1, 2])


# ---------------------------------------------------------------- fuzzing (hypothesis)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=2, max_size=30), st.sampled_from(["pearson", "spearman", "kendall"]))
def test_fuzz_correlation(values, metric):
    a = torch.tensor(values)
    r = correlation(a, a.flip(0), metric)
    assert math.isnan(r) or -1.0 <= r <= 1.0


def test_library_replacements_equal_the_hand_written_formulas():
    """torchmetrics' WER and F.kl_div replace hand-written code: same numbers."""
    import random

    from xattn_lightning.saliency.perturbation import kl_per_token
    from xattn_lightning.text import edit_distance, normalize_text, wer

    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "Dog,", "ran!"]
    refs = [" ".join(rng.choices(vocab, k=rng.randint(1, 8))) for _ in range(20)]
    hyps = [" ".join(rng.choices(vocab, k=rng.randint(0, 8))) for _ in range(20)]
    errors = sum(edit_distance(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps))
    words = sum(len(normalize_text(r)) for r in refs)
    assert wer(refs, hyps) == pytest.approx(100.0 * errors / words, abs=1e-4)  # torchmetrics sums in float32
    g = torch.Generator().manual_seed(0)
    logp_ref = torch.randn(5, 11, generator=g).log_softmax(-1)
    logits = torch.randn(3, 5, 11, generator=g)
    pos = torch.tensor([1, 2, 4])
    lp = logits[:, pos].log_softmax(-1)
    by_hand = (logp_ref[pos].exp() * (logp_ref[pos] - lp)).sum(-1)
    torch.testing.assert_close(kl_per_token(logp_ref, logits, pos), by_hand, rtol=1e-5, atol=1e-6)


def test_batched_agreement_grid_equals_the_per_head_loop():
    from xattn_lightning.functional import agreement

    g = torch.Generator().manual_seed(3)
    ca = torch.rand(3, 4, 5, 30, generator=g)
    ca[1, 2] = 0.25  # a constant head: undefined
    sm = torch.rand(5, 30, generator=g)
    for normalize in (True, False):
        grid = agreement_grid(ca, sm, "pearson", normalize)
        loop = torch.tensor(
            [[agreement(ca[li, h], sm, "pearson", normalize) for h in range(4)] for li in range(3)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(grid, loop, rtol=0, atol=1e-9, equal_nan=True)
        assert math.isnan(float(grid[1, 2]))
