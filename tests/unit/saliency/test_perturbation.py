"""``xattn_lightning.saliency.perturbation``: the mask loops (SPES on the input and on the encoder output), their halves, designs, smoothing, continuation, and the KL."""

import math

import pytest
import torch
from helpers import (
    ORACLE_REGIONS,
    Oracle,
    oracle_adapter,
    speaking_explain,
    speaking_tiny_whisper,
    tiny_whisper,
    whisper_batch,
)

import xattn_lightning as xl
from xattn_lightning.saliency.perturbation import segment_counts


def test_spes_same_seed_same_map_and_info():
    model = Oracle(ORACLE_REGIONS)
    a = oracle_adapter(model)
    x = {"input_features": torch.randn(1, 24, 4) + 2.0}
    kw = dict(targets=[[1, 5, 6, 7, 2]], methods=("spes", "encoder_spes"), n_masks=30, batch_size=7)
    e1 = xl.explain(a, x, seed=4, **kw)[0]
    e2 = xl.explain(a, x, seed=4, **kw)[0]
    e3 = xl.explain(a, x, seed=5, **kw)[0]
    assert torch.equal(e1.saliency["spes"], e2.saliency["spes"])
    assert torch.equal(e1.saliency["encoder_spes"], e2.saliency["encoder_spes"])
    assert not torch.equal(e1.saliency["spes"], e3.saliency["spes"])
    assert e1.results["spes"].n_masks == 30 and len(e1.results["spes"].details["segments"]) == 3


def test_spes_never_touches_whisper_padding():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    adapter = xl.adapter_for(model)
    seen = []
    orig = adapter.forward

    def spy(features, ids, output_attentions=True):
        seen.append(features.detach().clone())
        return orig(features, ids, output_attentions)

    adapter.forward = spy
    (e,) = xl.explain(adapter, batch, targets=[[51, 52, 5, 6, 50]], methods=("spes",), n_masks=12, batch_size=4)
    pad = batch["input_features"][0].T[30:]
    assert all(torch.equal(f[b, 30:], pad) for f in seen for b in range(f.shape[0]))
    assert any(
        not torch.equal(f[b, :30], batch["input_features"][0].T[:30]) for f in seen[2:] for b in range(f.shape[0])
    )
    assert e.saliency["spes"].shape == (2, 30, 16)
    assert e.pooled("spes").shape == (2, 15) and e.pooled("spes", "avg2d").shape == (2, 15)


def test_segment_counts_scale_with_duration_up_to_cap():
    assert segment_counts(500) == [2000, 2500, 3000]
    assert segment_counts(750) == segment_counts(5000) == [3000, 3750, 4500]
    assert segment_counts(100)[0] == 400


def test_split_half_reliability_and_attenuation_correction(oracle_exp):
    """Few masks: the raw ρ is pulled down by the map's noise; the corrected ρ recovers the
    many-mask value, and the reliability grows with the number of masks."""
    model = Oracle(ORACLE_REGIONS)
    x = torch.randn(1, 24, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    ad, b, t = oracle_adapter(model), {"input_features": x}, [[1, 5, 6, 7, 2]]
    (big,) = xl.explain(ad, b, targets=t, methods=("encoder_spes",), n_masks=2000, seed=0)
    raw, corr, rel = [], [], []
    for seed in range(4):
        (e,) = xl.explain(ad, b, targets=t, methods=("encoder_spes",), n_masks=32, seed=seed)
        raw.append(e.agreement("encoder_spes"))
        corr.append(e.agreement("encoder_spes", corrected=True))
        rel.append(e.reliability("encoder_spes"))
        halves = e.results["encoder_spes"].halves
        assert halves.shape == (2, *e.saliency["encoder_spes"].shape)
        assert torch.allclose((halves[0] + halves[1]) / 2, e.saliency["encoder_spes"], atol=0.15 * float(halves.max()))
    target = big.agreement("encoder_spes")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert abs(mean(corr) - target) < abs(mean(raw) - target) / 2
    assert mean(rel) < big.reliability("encoder_spes") <= 1.0
    assert oracle_exp.reliability("saliency") == 1.0  # gradient maps are exact
    assert oracle_exp.agreement("saliency", corrected=True) == oracle_exp.agreement("saliency")


def test_antithetic_masks_pair_complements_only_for_half_occlusion():
    from xattn_lightning.saliency.perturbation import draw_keep_masks

    m = draw_keep_masks(6, 10, 0.5, torch.Generator().manual_seed(0), "antithetic")
    assert torch.equal(m[:3], ~m[3:])  # every cell occluded in exactly half of the masks
    assert torch.equal(m.sum(0), torch.full((10,), 3))
    with pytest.raises(xl.XAttnError, match="p = 0.5"):
        draw_keep_masks(6, 10, 0.7, torch.Generator().manual_seed(0), "antithetic")


def _smooth_by_loop(x, width):
    """Reference: a binomial kernel applied frame by frame, the edges repeating the end frames."""
    taps = [math.comb(width - 1, k) for k in range(width)]
    taps = [t / sum(taps) for t in taps]
    half, n = width // 2, x.shape[-1]
    out = torch.zeros_like(x)
    for j in range(n):
        for k, w in enumerate(taps):
            out[..., j] += w * x[..., min(max(j + k - half, 0), n - 1)]
    return out


def test_smoothing_filters_the_encoder_map_and_its_halves_in_time():
    from xattn_lightning.functional import smooth_frames

    x = torch.randn(2, 3, 11)
    for width in (3, 5, 7):
        torch.testing.assert_close(smooth_frames(x, width), _smooth_by_loop(x, width), atol=1e-6, rtol=0)
    assert torch.equal(smooth_frames(x, 0), x)
    plain = speaking_explain(n_masks=16)
    smooth = speaking_explain(n_masks=16, smoothing=5)
    torch.testing.assert_close(smooth.saliency["encoder_spes"], smooth_frames(plain.saliency["encoder_spes"], 5))
    torch.testing.assert_close(
        smooth.results["encoder_spes"].halves, smooth_frames(plain.results["encoder_spes"].halves, 5)
    )
    assert smooth.results["encoder_spes"].details["smoothing"] == 5
    torch.testing.assert_close(smooth.saliency["spes"], plain.saliency["spes"])  # input SPES is not filtered
    m = tiny_whisper()
    with pytest.raises(xl.XAttnError, match="odd kernel width"):
        xl.explain(m, whisper_batch(m), targets=[[50257, 5, 50256]] * 2, methods=("encoder_spes",), smoothing=4)


def _count_masks(monkeypatch) -> list[int]:
    """Record how many masked passes every KL of the mask loops scores."""
    import xattn_lightning.saliency.perturbation as pert

    seen: list[int] = []
    real = pert.kl_per_token

    def spy(logp_ref, logits, positions=None):
        seen.append(int(getattr(logits, "approx", logits).shape[0]))  # PartlyExactLogits: vocabulary="bf16"
        return real(logp_ref, logits, positions)

    monkeypatch.setattr(pert, "kl_per_token", spy)
    return seen


def test_a_map_continued_from_256_masks_to_1024_is_the_map_of_1024_in_one_go(monkeypatch):
    m = speaking_tiny_whisper()
    batch = whisper_batch(m, lengths=(60,))
    kw = {"methods": ("encoder_spes",), "max_new_tokens": 5, "encoder_batch_size": 100}  # 256 = 2 x 100 + 56
    (whole,) = xl.explain(m, batch, n_masks=1024, **kw)
    seen = _count_masks(monkeypatch)
    (first,) = xl.explain(m, batch, n_masks=256, **kw)
    assert sum(seen) == 256
    seen.clear()
    (cont,) = xl.explain(m, batch, n_masks=1024, resume=[first], **kw)
    assert sum(seen) == 768  # only the masks the first map lacked
    assert cont.results["encoder_spes"].n_masks == 1024
    assert torch.equal(cont.decoder_ids, whole.decoder_ids)
    scale = float(whole.saliency["encoder_spes"].abs().max())  # KLs of a tiny random model: about 1e-5
    same = {"rtol": 1e-5, "atol": 1e-6 * scale}
    torch.testing.assert_close(cont.saliency["encoder_spes"], whole.saliency["encoder_spes"], **same)
    torch.testing.assert_close(cont.results["encoder_spes"].halves, whole.results["encoder_spes"].halves, **same)
    assert cont.reliability("encoder_spes") == pytest.approx(whole.reliability("encoder_spes"), abs=1e-5)
    assert float((first.saliency["encoder_spes"] - whole.saliency["encoder_spes"]).abs().max()) > 1e-3 * scale


def test_a_continued_input_spes_map_adds_only_the_missing_masks_and_a_mismatch_is_refused(monkeypatch):
    m = speaking_tiny_whisper()
    batch = whisper_batch(m, lengths=(60,))
    kw = {"methods": ("spes",), "max_new_tokens": 5}
    (first,) = xl.explain(m, batch, n_masks=12, **kw)
    seen = _count_masks(monkeypatch)
    (cont,) = xl.explain(m, batch, n_masks=30, resume=[first], **kw)
    assert sum(seen) == 18 and cont.results["spes"].n_masks == 30 and cont.results["spes"].state.n == 30
    assert torch.isfinite(cont.saliency["spes"]).all() and cont.saliency["spes"].shape == first.saliency["spes"].shape
    with pytest.raises(xl.XAttnError, match="Cannot continue a map drawn for"):  # another seed: other masks
        xl.explain(m, batch, n_masks=30, resume=[first], seed=1, **kw)
    with pytest.raises(xl.XAttnError, match="to fewer"):
        xl.explain(m, batch, n_masks=8, resume=[first], **kw)


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
