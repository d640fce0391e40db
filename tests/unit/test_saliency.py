import math

import pytest
import torch
from helpers import Oracle, oracle_adapter, speaking_tiny_whisper, tiny_speech2text, tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.saliency.perturbation import segment_counts

REGIONS = [range(0, 4), range(4, 8), range(8, 12)]  # encoder frames of tokens 0..2 (input frames x2)
ALL = (
    "spes",
    "encoder_spes",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "encoder_saliency",
    "encoder_input_x_gradient",
    "encoder_integrated_gradients",
)


@pytest.fixture(scope="module")
def oracle_exp():
    model = Oracle(REGIONS)
    x = torch.randn(1, 24, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    (e,) = xl.explain(
        oracle_adapter(model),
        {"input_features": x},
        targets=[[1, 5, 6, 7, 2]],
        methods=ALL,
        n_masks=400,
        seed=0,
        n_steps=8,
    )
    return e


@pytest.mark.parametrize("method", ALL)
def test_every_method_puts_its_mass_on_the_true_region(oracle_exp, method):
    pooled = oracle_exp.pooled(method)
    assert pooled.shape == (3, 12)
    # perturbation maps sit on a baseline (the mean KL of masks that occlude elsewhere): compare z-scores
    z = xl.functional.tokenwise_zscore(pooled)
    for i, r in enumerate(REGIONS):
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


def test_spes_same_seed_same_map_and_info():
    model = Oracle(REGIONS)
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


def test_captum_per_token_equals_manual_gradient():
    model = Oracle(REGIONS)
    x = torch.randn(1, 24, 4) + 1
    (e,) = xl.explain(oracle_adapter(model), {"input_features": x}, targets=[[1, 5, 6, 7, 2]], methods=("saliency",))
    xx = x.clone().requires_grad_()
    lp = model(xx, torch.tensor([[1, 5, 6, 7]])).log_softmax(-1)[0, 1, 6]
    (g,) = torch.autograd.grad(lp, xx)
    assert torch.allclose(e.saliency["saliency"][1], g[0].abs(), atol=1e-6)


def test_unknown_names_list_valid_ones():
    model = Oracle(REGIONS)
    batch = {"input_features": torch.randn(1, 24, 4)}
    with pytest.raises(xl.UnknownNameError, match="encoder_spes"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("occlusion",))
    with pytest.raises(xl.UnknownNameError, match="n_masks"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("spes",), masks=3)
    with pytest.raises(xl.XAttnError, match="sequence of method names"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods="spes")
    (e,) = xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]])
    with pytest.raises(xl.XAttnError, match="methods=\\('spes',\\)"):
        e.agreement("spes")
    with pytest.raises(xl.XAttnError, match="p in"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("spes",), p=1.5)


def test_segment_counts_scale_with_duration_up_to_cap():
    assert segment_counts(500) == [2000, 2500, 3000]
    assert segment_counts(750) == segment_counts(5000) == [3000, 3750, 4500]
    assert segment_counts(100)[0] == 400


GRADIENT_ALL = ALL[2:]  # the gradient methods, input and encoder space


@pytest.mark.parametrize("which", ["whisper", "custom"])
def test_batched_gradients_equal_captum_per_token(which):
    """One shared forward + batched backward gives Captum's maps (within 1e-4 of the largest value)."""
    if which == "whisper":
        model = tiny_whisper()
        batch, targets = whisper_batch(model, (50,)), [[51, 52, 5, 6, 7, 8, 50]]
    else:
        from xattn_lightning.testing import TinyS2T

        model = TinyS2T.adapter(TinyS2T(vocab_size=12))
        batch, targets = {"input_features": torch.randn(1, 32, 8)}, [[1, 5, 6, 7, 8, 2]]
    kw = dict(targets=targets, methods=GRADIENT_ALL, n_steps=6)
    (fast,) = xl.explain(model, batch, gradient_engine="batched", **kw)
    (ref,) = xl.explain(model, batch, gradient_engine="captum", **kw)
    for m in GRADIENT_ALL:
        a, b = fast.saliency[m], ref.saliency[m]
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-4 * max(float(b.abs().max()), 1e-12), m
    (chunked,) = xl.explain(model, batch, gradient_engine="batched", internal_batch_size=4, **kw)
    assert torch.allclose(
        chunked.saliency["integrated_gradients"],
        ref.saliency["integrated_gradients"],
        rtol=1e-4,
        atol=1e-4 * float(ref.saliency["integrated_gradients"].abs().max()),
    )
    with pytest.raises(xl.UnknownNameError, match="captum"):
        xl.explain(model, batch, gradient_engine="jax", **kw)


def test_split_half_reliability_and_attenuation_correction(oracle_exp):
    """Few masks: the raw ρ is pulled down by the map's noise; the corrected ρ recovers the
    many-mask value, and the reliability grows with the number of masks."""
    model = Oracle(REGIONS)
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


@pytest.mark.parametrize("name", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_batched_vjp_modes_agree_with_captum(name):
    from xattn_lightning.saliency.gradients import batched_attribute, captum_attribute, token_logprob_fn

    model = Oracle(REGIONS)
    ids = torch.tensor([1, 5, 6, 7, 2])
    fn = token_logprob_fn(lambda x: model(x, ids[:-1].unsqueeze(0).expand(x.shape[0], -1)), ids[1:], torch.arange(3))
    x = torch.randn(1, 24, 4) + 1
    ref = captum_attribute(name, fn, x.clone().requires_grad_(), 3, n_steps=5)
    for vjp in ("vmap", "loop"):
        got = batched_attribute(name, fn, x, 3, n_steps=5, vjp=vjp)
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-4), vjp


def _speaking_explain(**opts):
    from helpers import speaking_tiny_whisper

    m = speaking_tiny_whisper()
    return xl.explain(m, whisper_batch(m, lengths=(60,)), methods=("spes", "encoder_spes"), max_new_tokens=5, **opts)[0]


def test_auto_batch_sizes_off_cuda_take_the_cpu_defaults_and_give_the_same_maps():
    auto = _speaking_explain(n_masks=12, batch_size="auto", encoder_batch_size="auto")
    assert auto.results["spes"].details["batch_size"] == 8
    assert auto.results["encoder_spes"].details["batch_size"] == 12  # 1,024 rows of a few tokens, capped at n_masks
    fixed = _speaking_explain(n_masks=12, batch_size=8, encoder_batch_size=12)
    for m in ("spes", "encoder_spes"):
        torch.testing.assert_close(auto.saliency[m], fixed.saliency[m], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_gives_nearly_the_same_encoder_map():
    from xattn_lightning.functional import map_similarity

    f32 = _speaking_explain(n_masks=32)
    bf16 = _speaking_explain(n_masks=32, autocast="bf16")
    assert (
        map_similarity(f32.saliency["encoder_spes"], bf16.saliency["encoder_spes"]) > 0.9
    )  # real tiny.en on an H200: 0.9995
    assert not torch.equal(f32.saliency["encoder_spes"], bf16.saliency["encoder_spes"])  # it did run in bf16


@pytest.mark.parametrize(
    "opts, match",
    [({"autocast": "int8"}, "autocast"), ({"batch_size": 0}, "batch_size"), ({"encoder_batch_size": "big"}, "auto")],
)
def test_bad_precision_and_batch_size_options_are_refused(opts, match):
    m = tiny_whisper()
    with pytest.raises(xl.XAttnError, match=match):
        xl.explain(m, whisper_batch(m), targets=[[50257, 5, 50256]] * 2, methods=("encoder_spes",), **opts)


def test_option_defaults_live_in_one_place():
    """The SPES functions' signatures and the gradient engines take their defaults from the typed option
    families; flat options go to every family that takes them, and each is checked where it is made."""
    import inspect
    from dataclasses import fields

    from xattn_lightning.saliency.gradients import batched_attribute, captum_attribute
    from xattn_lightning.saliency.options import (
        EncoderSpesOptions,
        GradientOptions,
        SaliencyOptions,
        SpesOptions,
        flat_names,
    )
    from xattn_lightning.saliency.perturbation import spes_encoder, spes_input

    rename = {"encoder_batch_size": "batch_size"}
    for fn, cls in (
        (spes_input, SpesOptions),
        (spes_encoder, EncoderSpesOptions),
        (batched_attribute, GradientOptions),
        (captum_attribute, GradientOptions),
    ):
        params = inspect.signature(fn).parameters
        for f in fields(cls):
            name = rename.get(f.name, f.name) if fn is spes_encoder else f.name
            if name in params:
                assert params[name].default == f.default, (fn.__name__, name)
    from typing import get_args

    from xattn_lightning.saliency import METHODS, MethodName

    assert set(get_args(MethodName)) == set(METHODS) == set(ALL)  # the Literal names match the registry
    o = SaliencyOptions.from_flat(n_masks=64, p_h=0.5, n_steps=3)
    assert (o.encoder_spes.n_masks, o.spes.n_masks, o.encoder_spes.p_h, o.encoder_spes.encoder_batch_size) == (
        64, 64, 0.5, "auto",
    )  # fmt: skip
    assert o.gradient.n_steps == 3 and o.with_masks(128).spes.n_masks == 128
    assert set(o.flat()) == set(flat_names()) and SaliencyOptions.from_flat(**o.flat()) == o
    for bad, match in (({"p_h": 1.5}, "p_h"), ({"n_masks": 0}, "n_masks"), ({"sampling": "x"}, "sampling"),
                       ({"smoothing": 2}, "odd"), ({"n_steps": 0}, "n_steps"), ({"frame_rate": -1}, "frame_rate")):  # fmt: skip
        with pytest.raises(xl.XAttnError, match=match):
            SaliencyOptions.from_flat(**bad)
    # each method is handed its own family's object (the contract of the registry)
    assert {spec.options for spec in METHODS.values()} == {"spes", "encoder_spes", "gradient"}
    assert all(isinstance(o.family(spec.options), (SpesOptions, EncoderSpesOptions, GradientOptions)) for spec in METHODS.values())


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
    plain = _speaking_explain(n_masks=16)
    smooth = _speaking_explain(n_masks=16, smoothing=5)
    torch.testing.assert_close(smooth.saliency["encoder_spes"], smooth_frames(plain.saliency["encoder_spes"], 5))
    torch.testing.assert_close(
        smooth.results["encoder_spes"].halves, smooth_frames(plain.results["encoder_spes"].halves, 5)
    )
    assert smooth.results["encoder_spes"].details["smoothing"] == 5
    torch.testing.assert_close(smooth.saliency["spes"], plain.saliency["spes"])  # input SPES is not filtered
    m = tiny_whisper()
    with pytest.raises(xl.XAttnError, match="odd kernel width"):
        xl.explain(m, whisper_batch(m), targets=[[50257, 5, 50256]] * 2, methods=("encoder_spes",), smoothing=4)


def test_encoder_auto_batch_off_cuda_is_sized_by_explained_tokens_and_changes_no_map():
    from xattn_lightning.saliency.perturbation import CPU_ROWS_PER_BATCH, spes_encoder

    torch.manual_seed(0)
    t, vocab = 9, 11
    weight = torch.randn(t, vocab)

    def maps(tokens: int, batch_size):
        logp = torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(tokens)).log_softmax(-1)
        seen = []

        def run(keep):  # logits that depend on which frames are kept: [B, tokens, V]
            seen.append(keep.shape[0])
            return (keep.float() @ weight).unsqueeze(1).expand(-1, tokens, -1) + torch.arange(tokens).view(1, -1, 1)

        r = spes_encoder(run, t, logp, None, n_masks=40, batch_size=batch_size, seed=3)
        return r.map, r.details, seen

    short, info_s, seen_s = maps(4, "auto")
    assert info_s["batch_size"] == 40 and seen_s == [40]  # few tokens: every mask in one batch
    rows = CPU_ROWS_PER_BATCH // 7 + 1  # 7 masks' rows overflow the budget: 6 per batch
    long, info_l, seen_l = maps(rows, "auto")
    assert info_l["batch_size"] == 6 and max(seen_l) * rows <= CPU_ROWS_PER_BATCH
    for tokens, auto in ((4, short), (rows, long)):
        fixed, _, _ = maps(tokens, 1)
        torch.testing.assert_close(auto, fixed, rtol=1e-5, atol=1e-7)


def _count_masks(monkeypatch) -> list[int]:
    """Record how many masked passes every KL of the mask loops scores."""
    import xattn_lightning.saliency.perturbation as pert

    seen: list[int] = []
    real = pert.kl_per_token

    def spy(logp_ref, logits, positions=None):
        seen.append(int(logits.shape[0]))
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


def test_a_bf16_vocabulary_keeps_the_encoder_map_and_is_refused_where_there_is_no_linear_head():
    from xattn_lightning.functional import map_similarity
    from xattn_lightning.testing import TinyS2T

    exact = _speaking_explain(n_masks=48)
    bf16 = _speaking_explain(n_masks=48, vocabulary="bf16")
    # a near-uniform random model's KLs (1e-5) sit near bfloat16's rounding: 0.94 here; real tiny.en in docs/costs.md
    assert map_similarity(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"]) > 0.9
    assert not torch.equal(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"])  # it did run in bf16
    torch.testing.assert_close(exact.saliency["spes"], bf16.saliency["spes"])  # input SPES is unchanged
    with pytest.raises(xl.XAttnError, match="Unknown vocabulary 'fp8'"):
        _speaking_explain(n_masks=8, vocabulary="fp8")
    with pytest.raises(xl.XAttnError, match="linear output head"):
        xl.explain(
            TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
            targets=[[1, 5, 6, 2]], methods=("encoder_spes",), n_masks=8, vocabulary="bf16",
        )  # fmt: skip


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
