"""``xattn_lightning.saliency.vocabulary``: the bfloat16 vocabulary term."""

import pytest
import torch
from helpers import speaking_explain

import xattn_lightning as xl


def test_a_bf16_vocabulary_keeps_the_encoder_map_and_is_refused_where_there_is_no_linear_head():
    from xattn_lightning.functional import map_similarity
    from xattn_lightning.testing import TinyS2T

    exact = speaking_explain(n_masks=48)
    bf16 = speaking_explain(n_masks=48, vocabulary="bf16")
    # a near-uniform random model's KLs (1e-5) sit near bfloat16's rounding: 0.94 here; real tiny.en in docs/costs.md
    assert map_similarity(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"]) > 0.9
    assert not torch.equal(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"])  # it did run in bf16
    torch.testing.assert_close(exact.saliency["spes"], bf16.saliency["spes"])  # input SPES is unchanged
    with pytest.raises(xl.XAttnError, match="Unknown vocabulary 'fp8'"):
        speaking_explain(n_masks=8, vocabulary="fp8")
    with pytest.raises(xl.XAttnError, match="linear output head"):
        xl.explain(
            TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
            targets=[[1, 5, 6, 2]], methods=("encoder_spes",), n_masks=8, vocabulary="bf16",
        )  # fmt: skip
