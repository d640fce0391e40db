"""``xattn_lightning.timestamps.words``: word timestamps of a model, their default and its options."""

import pytest
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.functional.alignment import (
    DURATION_PRIOR,
    select_heads_by_agreement,
)
from xattn_lightning.timestamps import TimingOptions, align, alignment_token_times


def test_word_timestamps_on_a_tiny_model_are_ordered_and_inside_the_audio():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}" if i % 2 else f"x{i}"  # noqa: E731
    words = xl.word_timestamps(m, b, tokenizer=tok, heads=[[0, 0], [1, 1]])[0]
    assert words, "no words"
    starts = [s for _, s, _ in words]
    assert starts == sorted(starts)
    assert all(0.0 <= s <= e <= 60 / 2 * 0.02 + 1e-9 for _, s, e in words)
    a = align(m, b, tokenizer=tok)[0]
    t = alignment_token_times(a, [[0, 0]], timing=TimingOptions(method="transformers"))
    assert float(t[-1]) == float(t[-2])  # transformers' convention: EOS repeats the last token's time


def test_default_word_timestamps_use_the_chosen_heads_with_the_prior_and_silences_and_no_saliency():
    from xattn_lightning.timestamps import (
        alignment_from,
        alignment_words,
        cached_heads,
        choose_heads_from,
        ensemble_words,
        span_occluder,
    )

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    b["input_features"][0, :, 20:30] = b["input_features"][0].min()  # a silence of 100 ms in the first
    tok = lambda i: f" w{i}"  # noqa: E731
    got = xl.word_timestamps(m, b, tokenizer=tok)
    exps = xl.explain(m, b, tokenizer=tok)
    assert all(not e.saliency for e in exps)  # one pass, no saliency
    alignments = [alignment_from(e) for e in exps]
    assert (0.2, 0.3) in alignments[0].silences  # input frames 20-30 at 100 per second
    ad = xl.adapter_for(m)
    features = [u.features for u in ad.utterances(ad.model_batch(b))]
    choice = choose_heads_from(alignments, ad.alignment_heads(), scores=span_occluder(ad, alignments, features))
    assert cached_heads(m) == choice  # chosen on these two utterances (not yet final: fewer than 8)
    default = TimingOptions(duration_prior=DURATION_PRIOR, silence=True)
    want = [ensemble_words(a, choice.head_sets, timing=default) for a in alignments]
    assert got == want
    every = [alignment_words(a, None, timing=default) for a in alignments]
    assert xl.word_timestamps(m, b, tokenizer=tok, heads="all") == every
    plain = [alignment_words(a, None) for a in alignments]
    assert plain != every  # the prior and the silences change something here
    assert xl.word_timestamps(m, b, tokenizer=tok, heads="all", duration_prior=0, silence=False) == plain


def test_agreement_heads_choose_per_utterance_and_fuse_saliency():
    from xattn_lightning.timestamps import FUSION_WEIGHT, alignment_from, alignment_words

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    got = xl.word_timestamps(m, b, tokenizer=tok, heads="agreement", n_masks=16)
    exps = xl.explain(m, b, methods=("encoder_spes",), tokenizer=tok, n_masks=16)
    want = [
        alignment_words(
            alignment_from(e),
            select_heads_by_agreement(e.agreement_grid("encoder_spes")),
            timing=TimingOptions(fusion=FUSION_WEIGHT, duration_prior=DURATION_PRIOR, silence=True),
        )
        for e in exps
    ]
    assert got == want


def test_transformers_method_takes_no_prior_or_silences():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    a = align(m, b, tokenizer=tok)[0]
    (words,) = xl.word_timestamps(m, b, tokenizer=tok, method="transformers", heads="all")
    assert words == xl.timestamps.alignment_words(a, None, timing=TimingOptions(method="transformers"))
    with pytest.raises(xl.XAttnError, match="duration_prior or silence"):
        xl.word_timestamps(m, b, tokenizer=tok, method="transformers", silence=True)


def test_subframe_boundaries_stay_ordered_and_within_a_frame_of_the_dtw_ones():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    plain = {"duration_prior": 0.0, "silence": False}  # DTW boundaries on whole frames
    whole = xl.word_timestamps(m, b, tokenizer=tok, heads="all", **plain)[0]
    sub = xl.word_timestamps(m, b, tokenizer=tok, heads="all", subframe=True, **plain)[0]
    assert [w for w, _, _ in sub] == [w for w, _, _ in whole]
    assert all(abs(s / 0.02 - round(s / 0.02)) < 1e-6 for _, s, _ in whole)  # DTW: whole frames
    starts = [s for _, s, _ in sub]
    assert starts == sorted(starts)
    assert all(abs(a[1] - b_[1]) <= 0.02 + 1e-9 for a, b_ in zip(sub, whole))
