import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.functional import (
    aggregate_attention,
    agreement,
    agreement_grid,
    correlation,
    deletion_auc,
    framewise_zscore,
    per_token_correlation,
    pool_saliency,
    resolve_layers,
    tokenwise_zscore,
)
from xattn_lightning.functional.pooling import broadcast_to_input


def test_aggregate_presets():
    ca = torch.rand(4, 3, 5, 7)
    assert torch.allclose(aggregate_attention(ca), ca.mean((0, 1)))
    assert torch.allclose(aggregate_attention(ca, layers="last"), ca[3].mean(0))
    assert torch.allclose(aggregate_attention(ca, layers="last_2"), ca[2:].mean((0, 1)))
    assert torch.allclose(aggregate_attention(ca, layers=[0], heads=[1, 2]), ca[0, 1:].mean(0))
    assert torch.allclose(aggregate_attention(ca, pairs=[[1, 0], [3, 2]]), (ca[1, 0] + ca[3, 2]) / 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": 4}, "out of range"),
        ({"layers": []}, "non-empty"),
        ({"heads": [5]}, "out of range"),
        ({"layers": "last_9"}, "last_k"),
        ({"layers": "first"}, "Unknown layer preset"),
        ({"pairs": []}, "non-empty"),
        ({"pairs": [(0, 0)], "layers": 1}, "either"),
    ],
)
def test_aggregate_errors(kwargs, match):
    with pytest.raises(XAttnError, match=match):
        aggregate_attention(torch.rand(4, 3, 5, 7), **kwargs)


def test_aggregate_rejects_wrong_rank():
    with pytest.raises(XAttnError, match="4-D"):
        aggregate_attention(torch.rand(3, 5, 7))


def test_resolve_layers_negative():
    assert resolve_layers(-1, 6) == [5]


def test_framewise_zscore_matches_numpy():
    x = torch.rand(6, 9)
    ref = (x.numpy() - x.numpy().mean(0)) / x.numpy().std(0, ddof=1)
    assert np.allclose(framewise_zscore(x).numpy(), ref, atol=1e-5)


def test_tokenwise_zscore_matches_numpy():
    x = torch.rand(3, 8, 2)
    flat = x.reshape(3, -1).numpy()
    ref = (flat - flat.mean(1, keepdims=True)) / flat.std(1, ddof=1, keepdims=True)
    assert np.allclose(tokenwise_zscore(x).reshape(3, -1).numpy(), ref, atol=1e-5)


def test_pooling_modes():
    sm = torch.arange(24.0).reshape(1, 6, 4)  # T=6, F=4
    assert pool_saliency(sm, 2).tolist() == [[7.0, 15.0, 23.0]]
    assert pool_saliency(sm, 2, mode="avg2d").tolist() == [[3.5, 11.5, 19.5]]
    assert pool_saliency(sm, 2, mode="max_mean").tolist() == [[5.0, 13.0, 21.0]]
    # partial last window (T=5 frames, s=2 -> T'=3): pools only the frame it has
    assert pool_saliency(sm[:, :5], 2).tolist() == [[7.0, 15.0, 19.0]]
    assert pool_saliency(sm[:, :5], 2, mode="avg2d").tolist() == [[3.5, 11.5, 17.5]]
    with pytest.raises(UnknownNameError, match="max2d"):
        pool_saliency(sm, 2, mode="median")
    with pytest.raises(XAttnError, match="time, freq"):
        pool_saliency(sm[0], 2)


def test_broadcast_roundtrip():
    ca = torch.rand(3, 5)
    big = broadcast_to_input(ca, 4, 19, 6)
    assert big.shape == (3, 19, 6)
    assert torch.allclose(pool_saliency(big, 4, 5), ca)


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


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 9),
    st.sampled_from(["random", "zeros", "constant_rows", "nan"]),
    st.integers(0, 2**16),
)
def test_fuzz_aggregation_normalisation_agreement(L, H, I, T, kind, seed):
    g = torch.Generator().manual_seed(seed)
    ca = torch.rand(L, H, I, T, generator=g)
    sm = torch.rand(I, T, generator=g)
    if kind == "zeros":
        ca.zero_()
    elif kind == "constant_rows":
        sm[:] = 3.0
    elif kind == "nan":
        sm[0, 0] = float("nan")
    agg = aggregate_attention(ca)
    assert torch.isfinite(agg).all()
    assert torch.isfinite(framewise_zscore(agg)).all()
    if kind != "nan":
        assert torch.isfinite(tokenwise_zscore(sm)).all()
    r = agreement(agg, sm)
    # a correlation is either a finite value in [-1, 1] or an explicit nan (undefined), never out of range
    assert math.isnan(r) or -1.0 <= r <= 1.0
    if kind in ("zeros", "constant_rows", "nan"):
        assert math.isnan(r)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 40),
    st.integers(1, 6),
    st.integers(1, 5),
    st.sampled_from(["max2d", "avg2d", "max_mean"]),
    st.integers(0, 2**16),
)
def test_fuzz_pooling(I, T, F, s, mode, seed):
    sm = torch.rand(I, T, F, generator=torch.Generator().manual_seed(seed))
    out = pool_saliency(sm, s, mode=mode)
    assert out.shape == (I, math.ceil(T / s))
    assert torch.isfinite(out).all()
    assert float(out.max()) <= float(sm.max()) + 1e-6 and float(out.min()) >= 0.0


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


@pytest.mark.parametrize("batch", [1, 5, 70])
def test_kl_per_token_matches_float64_on_a_large_vocabulary(batch):
    """The one-pass KL (shifted logits, row chunks on CPU) against log_softmax in float64, on logits
    of Whisper's size and scale (51,864 words, |z| up to ~30): within 2e-6, with tokens taken in
    any order and the all-rows shortcut."""
    from xattn_lightning.saliency.perturbation import kl_per_token

    g = torch.Generator().manual_seed(batch)
    v = 51_864
    base = torch.randn(6, v, generator=g) * 4 + 8 * (torch.arange(v) % 97 == 0)
    logp_ref = base.log_softmax(-1)
    logits = base + torch.randn(batch, 6, v, generator=g) * 2
    pos = torch.tensor([4, 1, 2])
    for positions in (pos, torch.arange(6), None):
        rows = slice(None) if positions is None else positions
        lr = logp_ref[rows].double()
        exact = (lr.exp() * (lr - logits[:, rows].double().log_softmax(-1))).sum(-1)
        got = kl_per_token(logp_ref, logits, positions)
        assert got.shape == exact.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6)


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


def _pool_by_loop(sm, s, num_frames, mode):
    """Reference pooling, one window at a time."""
    out = torch.zeros(sm.shape[0], num_frames)
    for j in range(num_frames):
        win = sm[:, j * s : (j + 1) * s]
        if win.shape[1] == 0:
            continue  # a window past the input carries no saliency
        if mode == "max2d":
            out[:, j] = win.flatten(1).amax(1)
        elif mode == "avg2d":
            out[:, j] = win.flatten(1).mean(1)
        else:
            out[:, j] = win.amax(-1).mean(1)
    return out


@pytest.mark.parametrize("mode", ["max2d", "avg2d", "max_mean"])
def test_pooling_equals_window_by_window_reference(mode):
    g = torch.Generator().manual_seed(0)
    for t in (1, 3, 8, 9, 33):
        for s in (1, 2, 4):
            for num_frames in (None, 1, 5, 20):
                sm = torch.randn(3, t, 5, generator=g)
                n = num_frames or -(-t // s)
                expected = _pool_by_loop(sm, s, n, mode)
                torch.testing.assert_close(pool_saliency(sm, s, num_frames, mode), expected, atol=1e-6, rtol=0)
