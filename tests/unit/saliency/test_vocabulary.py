"""``xattn_lightning.saliency.vocabulary``: the bfloat16 vocabulary term."""

import pytest
import torch
from helpers import speaking_explain

import xattn_lightning as xl


def test_a_bf16_vocabulary_keeps_the_encoder_map_and_is_refused_where_there_is_no_linear_head():
    from xattn_lightning.functional import map_similarity
    from xattn_lightning.testing import TinyS2T

    exact = speaking_explain(n_masks=48, vocabulary="exact")
    bf16 = speaking_explain(n_masks=48, vocabulary="bf16")
    assert (exact.results["encoder_spes"].details["vocabulary"], bf16.results["encoder_spes"].details["vocabulary"]) == (
        "exact", "bf16"
    )
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


@pytest.mark.parametrize("units", [True, False])
def test_the_default_vocabulary_is_bf16_only_where_the_machine_has_bf16_units(monkeypatch, units):
    from xattn_lightning.saliency import vocabulary

    monkeypatch.setattr(vocabulary, "has_bf16_units", lambda device: units)
    default = speaking_explain(n_masks=16)
    chosen = speaking_explain(n_masks=16, vocabulary="bf16" if units else "exact")
    assert default.results["encoder_spes"].details["vocabulary"] == ("bf16" if units else "exact")
    torch.testing.assert_close(default.saliency["encoder_spes"], chosen.saliency["encoder_spes"], rtol=0, atol=0)


def test_the_default_vocabulary_falls_back_to_exact_without_a_linear_head_or_under_autocast(monkeypatch):
    from xattn_lightning.saliency import vocabulary
    from xattn_lightning.testing import TinyS2T

    monkeypatch.setattr(vocabulary, "has_bf16_units", lambda device: True)
    (e,) = xl.explain(
        TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
        targets=[[1, 5, 6, 2]], methods=("encoder_spes",), n_masks=8,
    )  # fmt: skip
    assert e.results["encoder_spes"].details["vocabulary"] == "exact"
    under_autocast = speaking_explain(n_masks=8, autocast="bf16")  # "auto" gives way; only "bf16" is refused
    assert under_autocast.results["encoder_spes"].details["vocabulary"] == "exact"
    with pytest.raises(xl.XAttnError, match="choose one"):
        speaking_explain(n_masks=8, autocast="bf16", vocabulary="bf16")


def test_bf16_units_are_looked_for_on_cpus_only():
    from xattn_lightning.saliency.vocabulary import has_bf16_units

    assert has_bf16_units("cuda") is False and has_bf16_units("meta") is False
    assert has_bf16_units("cpu") is bool(torch.cpu._is_amx_tile_supported())
