"""``xattn_lightning.functional.pooling``: saliency pooled to encoder frames and back."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.functional import (
    pool_saliency,
)
from xattn_lightning.functional.pooling import broadcast_to_input


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
