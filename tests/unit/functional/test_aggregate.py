"""``xattn_lightning.functional.aggregate``: layers × heads aggregation and the z-scores."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xattn_lightning.errors import XAttnError
from xattn_lightning.functional import (
    aggregate_attention,
    agreement,
    framewise_zscore,
    resolve_layers,
    tokenwise_zscore,
)


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
