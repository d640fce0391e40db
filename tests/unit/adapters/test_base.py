"""``xattn_lightning.adapters.base``: what every adapter does: targets checked, whole passes where there are no split passes."""

import pytest
import torch
from helpers import tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.testing import TinyS2T


def test_bad_targets():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    with pytest.raises(xl.XAttnError, match="only special tokens"):
        xl.explain(model, batch, targets=[[51, 52, 50]])
    with pytest.raises(xl.XAttnError, match="target is empty"):
        xl.explain(model, batch, targets=[[]])
    with pytest.raises(xl.XAttnError, match="at most 24"):
        xl.explain(model, batch, targets=[[51, 52] + [5] * 30 + [50]])
    with pytest.raises(xl.XAttnError, match="labels"):
        xl.explain(model, batch, targets="labels")
    with pytest.raises(xl.UnknownNameError, match="generate"):
        xl.explain(model, batch, targets="reference")
    with pytest.raises(xl.XAttnError, match="2 target sequences for 1"):
        xl.explain(model, batch, targets=[[51, 5, 50], [51, 6, 50]])


def test_an_adapter_without_split_passes_is_explained_in_whole_passes():
    """``split_passes=False`` (a declared capability, not a raised error): no encoder-only pass is tried, and the
    explanation equals the one made with the shared encoder pass."""

    model = TinyS2T()
    split = TinyS2T.adapter(model)

    class Whole(type(split)):
        split_passes = False

        def encode(self, features):
            raise AssertionError("an adapter without split passes was asked for an encoder-only pass")

    whole = TinyS2T.adapter(model)
    whole.__class__ = Whole
    batch = {"input_features": torch.randn(1, 40, 8), "labels": torch.tensor([[1, 5, 6, 7, 2]])}
    (a,) = xl.explain(split, batch, targets="labels", methods=("spes",), n_masks=4)
    (b,) = xl.explain(whole, batch, targets="labels", methods=("spes",), n_masks=4)
    torch.testing.assert_close(a.cross_attention, b.cross_attention)
    torch.testing.assert_close(a.saliency["spes"], b.saliency["spes"])
