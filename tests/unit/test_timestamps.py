"""Word timestamps and alignment heads: the maths against transformers, selection, the real model."""


import numpy as np
import pytest
import torch
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.functional.alignment import (
    DURATION_PRIOR,
    alignment_matrix,
    boundary_errors,
    dtw,
    group_words,
    length_prior,
    median_filter,
    select_heads_by_agreement,
    timing_summary,
    token_times,
    with_duration_prior,
)
from xattn_lightning.functional.silence import silent_spans, snap_to_silence
from xattn_lightning.timestamps import align, alignment_token_times


def test_dtw_and_median_filter_equal_transformers():
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    rng = np.random.default_rng(0)
    for shape in [(1, 7), (7, 1), (3, 5), (12, 40), (30, 150)]:
        m = rng.standard_normal(shape)
        ours, theirs = dtw(m), _dynamic_time_warping(m)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1]), shape
    x = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(median_filter(x, 7), _median_filter(x, 7))


def test_alignment_matrix_weights_and_bad_heads():
    ca = torch.rand(2, 3, 4, 20, generator=torch.Generator().manual_seed(1))
    one = alignment_matrix(ca, [[1, 2]])
    assert torch.allclose(alignment_matrix(ca, [[1, 2], [0, 0]], weights=[1.0, 0.0]), one)
    assert torch.allclose(alignment_matrix(ca), alignment_matrix(ca, [[li, h] for li in range(2) for h in range(3)]))
    with pytest.raises(xl.XAttnError, match="outside"):
        alignment_matrix(ca, [[2, 0]])
    with pytest.raises(xl.XAttnError, match="weights"):
        alignment_matrix(ca, [[0, 0]], weights=[-1.0])


def test_words_group_spaces_and_punctuation():
    assert group_words([" Hello", ",", " wor", "ld", "."]) == [[0, 1], [2, 3, 4]]


def test_boundary_errors_count_only_units_the_transcript_got_right():
    ref = [("The", 0.0, 0.2), ("in the", 0.2, 0.5), ("north", 0.5, 0.9)]
    hyp = [("the", 0.01, 0.21), ("in", 0.25, 0.3), ("the", 0.3, 0.5), ("south", 0.5, 0.9)]
    errs = boundary_errors(hyp, ref)
    assert errs == pytest.approx([0.01, 0.01, 0.05, 0.0])  # "north" was misrecognised: not counted
    s = timing_summary(errs)
    assert s["boundaries"] == 4 and s["mae_ms"] == pytest.approx(17.5) and s["within_50ms"] == 1.0


def test_select_heads_by_agreement_takes_those_above_the_mean_or_k():
    grid = torch.tensor([[0.1, 0.5, float("nan")], [0.3, 0.2, 0.6]])
    assert select_heads_by_agreement(grid) == [[1, 2], [0, 1]]  # mean 0.34
    assert select_heads_by_agreement(grid, k=3) == [[1, 2], [0, 1], [1, 0]]


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
    t = alignment_token_times(a, [[0, 0]], method="transformers")
    assert float(t[-1]) == float(t[-2])  # transformers' convention: EOS repeats the last token's time


def test_default_word_timestamps_use_the_chosen_heads_with_the_prior_and_silences_and_no_saliency():
    from xattn_lightning.timestamps import alignment_from, alignment_words, cached_heads, choose_heads_from

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    b["input_features"][0, :, 20:30] = b["input_features"][0].min()  # a silence of 100 ms in the first
    tok = lambda i: f" w{i}"  # noqa: E731
    got = xl.word_timestamps(m, b, tokenizer=tok)
    exps = xl.explain(m, b, tokenizer=tok)
    assert all(not e.saliency for e in exps)  # one pass, no saliency
    alignments = [alignment_from(e) for e in exps]
    assert (0.2, 0.3) in alignments[0].silences  # input frames 20-30 at 100 per second
    choice = choose_heads_from(alignments, xl.adapter_for(m).alignment_heads())
    assert cached_heads(m) == choice  # chosen on these two utterances (not yet final: fewer than 8)
    want = [alignment_words(a, choice.heads, duration_prior=DURATION_PRIOR, silence=True) for a in alignments]
    assert got == want
    every = [alignment_words(a, None, duration_prior=DURATION_PRIOR, silence=True) for a in alignments]
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
            fusion=FUSION_WEIGHT,
            duration_prior=DURATION_PRIOR,
            silence=True,
        )
        for e in exps
    ]
    assert got == want
    with pytest.raises(xl.XAttnError, match="fusion"):
        alignment_token_times(alignment_from(exps[0]), method="transformers", fusion=0.2)


def test_transformers_method_takes_no_prior_or_silences():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    a = align(m, b, tokenizer=tok)[0]
    (words,) = xl.word_timestamps(m, b, tokenizer=tok, method="transformers")
    assert words == xl.timestamps.alignment_words(a, None, method="transformers")
    with pytest.raises(xl.XAttnError, match="duration_prior or silence"):
        xl.word_timestamps(m, b, tokenizer=tok, method="transformers", silence=True)
    with pytest.raises(xl.XAttnError, match="openai"):
        alignment_token_times(a, method="transformers", duration_prior=0.5)


def test_length_prior_favours_longer_spellings_and_gives_punctuation_and_end_of_text_the_least():
    p = length_prior([" a", " wonderful", ",", " day"])
    assert p.shape == (5,) and abs(float(p.mean())) < 1e-6
    assert float(p[1]) > float(p[3]) > float(p[0]) > float(p[2]) == float(p[4])
    assert length_prior([" ab", "cd"], rows=2).tolist() == [0.0, 0.0]  # equal spellings: no prior
    assert length_prior([" one", " two"], rows=2).abs().sum() == 0  # rows cut the end-of-text row


def test_duration_prior_gives_a_short_spelled_token_fewer_frames():
    # two tokens whose attention cannot tell where one ends: the boundary follows their spellings
    m = torch.zeros(3, 20)
    m[2, 18:] = 1.0  # end of text in the last two frames
    m[0, :2], m[1, 16:18] = 1.0, 1.0
    even = token_times(with_duration_prior(m, torch.zeros(3), 0.5))
    short_first = token_times(with_duration_prior(m, length_prior([" a", " wonderful"]), 0.5))
    long_first = token_times(with_duration_prior(m, length_prior([" wonderful", " a"]), 0.5))
    assert float(short_first[1]) < float(even[1]) <= float(long_first[1])
    assert float(long_first[1]) - float(short_first[1]) >= 0.2  # at least ten frames apart
    with pytest.raises(ValueError, match="one prior per row"):
        with_duration_prior(m, torch.zeros(2))


def test_silent_spans_find_runs_below_the_floor_plus_a_share_of_the_median():
    e = torch.full((100,), 4.0)
    e[10:20] = -1.0  # 100 ms of silence
    e[50] = -1.0  # a 10 ms dip: too short
    e[80:83] = 1.0  # quieter, still above floor + 0.3 * (median - floor) = 0.5
    assert silent_spans(e, 0.01) == [(0.1, 0.2)]
    assert silent_spans(e, 0.01, min_seconds=0.01) == [(0.1, 0.2), (0.5, 0.51)]
    assert silent_spans(e, 0.01, level=0.5) == [(0.1, 0.2), (0.8, 0.83)]
    assert silent_spans(torch.zeros(0)) == []
    # padding (the quietest value repeated to the end) is silent and does not set the floor: pauses at a noise floor
    # well above it are still found
    noisy = torch.cat([torch.full((100,), 4.0), torch.full((200,), -8.0)])
    noisy[10:20] = 1.0
    assert silent_spans(noisy, 0.01) == [(0.1, 0.2), (1.0, 3.0)]


def test_snap_to_silence_moves_only_boundaries_near_a_silence_and_keeps_every_word():
    words = [("a", 0.0, 0.5), ("b", 0.5, 1.0), ("c", 1.0, 1.6)]
    got = snap_to_silence(words, [(0.47, 0.58), (1.2, 1.3)], window=0.04)
    assert got == [("a", 0.0, 0.47), ("b", 0.58, 1.0), ("c", 1.0, 1.6)]  # 1.2-1.3 is 0.2 s from any boundary
    # a silence that would leave a word no time is not used
    assert snap_to_silence(words, [(0.45, 1.02)]) == words
    # leading and trailing silences trim the first and the last word
    assert snap_to_silence(words, [(0.0, 0.03), (1.58, 2.0)]) == [("a", 0.03, 0.5), ("b", 0.5, 1.0), ("c", 1.0, 1.58)]
    assert snap_to_silence([], [(0.0, 1.0)]) == []


def test_alignment_heads_label_free_ranks_by_agreement_and_applies():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 40))
    heads = xl.alignment_heads(m, [b], n_masks=16, k=2, apply=True)
    assert len(heads) == 2 and all(len(h) == 2 for h in heads)
    assert m.generation_config.alignment_heads == heads
    grid = xl.timestamps.head_agreement(m, [b], n_masks=16)
    assert [list(h) for h in heads] == select_heads_by_agreement(grid, 2)


def test_supervised_needs_words():
    m = speaking_tiny_whisper()
    with pytest.raises(xl.XAttnError, match="words"):
        xl.alignment_heads(m, [whisper_batch(m, lengths=(60,))], supervised=True)


# --- real Whisper tiny.en ---------------------------------------------------------------------------








def test_subframe_boundaries_stay_ordered_and_within_a_frame_of_the_dtw_ones():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    plain = {"duration_prior": 0.0, "silence": False}  # DTW boundaries on whole frames
    whole = xl.word_timestamps(m, b, tokenizer=tok, **plain)[0]
    sub = xl.word_timestamps(m, b, tokenizer=tok, subframe=True, **plain)[0]
    assert [w for w, _, _ in sub] == [w for w, _, _ in whole]
    assert all(abs(s / 0.02 - round(s / 0.02)) < 1e-6 for _, s, _ in whole)  # DTW: whole frames
    starts = [s for _, s, _ in sub]
    assert starts == sorted(starts)
    assert all(abs(a[1] - b_[1]) <= 0.02 + 1e-9 for a, b_ in zip(sub, whole))


def _planted_alignment(seed: int, lower: str = "late"):
    """An utterance of 8 one-token words whose true boundaries are dips of the input's level; layers 2-3 of a
    4-layer × 2-head model attend to each word's true span (planted diagonal heads), layers 0-1 to the span 12
    frames later (``lower="late"``: as sharp, but late) or at random (``"noise"``), all with some noise."""
    from xattn_lightning.timestamps import Alignment

    g = torch.Generator().manual_seed(seed)
    n_words, frames = 8, 150  # encoder frames of 20 ms
    lengths = 6 + torch.randint(0, 12, (n_words,), generator=g)
    edges = [5, *(5 + torch.cumsum(lengths, 0)).tolist()]
    energy = torch.ones(2 * frames)  # input frames of 10 ms
    for b in edges[1:-1]:
        energy[2 * b - 1 : 2 * b + 2] = -1.0  # a dip at every true boundary
    ca = torch.rand(4, 2, n_words + 1, frames, generator=g) * 0.05
    for j in range(n_words):
        s, e = edges[j], edges[j + 1]
        ca[2:, :, j, s:e] += 1.0
        ca[:2, :, j, min(s + 12, frames - 1) : min(e + 12, frames)] += 1.0
    ca[2:, :, n_words, edges[-1] : edges[-1] + 5] += 1.0
    ca[:2, :, n_words, edges[-1] + 12 : edges[-1] + 17] += 1.0
    if lower == "noise":
        ca[:2] = torch.rand(2, 2, n_words + 1, frames, generator=g)
    ca = ca / ca.sum(-1, keepdim=True)
    true = [(f"w{j}", edges[j] * 0.02, edges[j + 1] * 0.02) for j in range(n_words)]
    a = Alignment(
        decoder_ids=torch.arange(n_words + 2),
        cross_attention=ca,
        num_prompt=1,
        pieces=[f" w{j}" for j in range(n_words)],
        frame_seconds=0.02,
        silences=[],
        energy=energy,
    )
    return a, true


@pytest.mark.parametrize("lower", ["late", "noise"])
def test_the_criterion_picks_the_planted_diagonal_heads_over_late_or_noise_heads(lower):
    from xattn_lightning.timestamps import alignment_words, boundary_energy, choose_heads_from

    planted = [_planted_alignment(seed, lower) for seed in range(3)]
    aligns = [a for a, _ in planted]
    choice = choose_heads_from(aligns, shipped=[[0, 0], [1, 1]])  # shipped: two of the lower heads
    assert set(choice.candidates) == {"all", "upper_half", "model", "consistent"}
    err = {
        n: xl.timestamps.timing_scores([alignment_words(a, h) for a in aligns], [t for _, t in planted])["mae_ms"]
        for n, h in choice.candidates.items()
    }
    assert choice.name != "model" and err[choice.name] == min(err.values()), (choice, err)  # the best aligner
    if lower == "late":  # averaged in, late heads move the boundaries: only the planted heads are right
        assert choice.name in ("upper_half", "consistent") and all(li >= 2 for li, _ in choice.heads), choice
        assert choice.scores[choice.name] < min(choice.scores["all"], choice.scores["model"]) - 0.3
        assert err[choice.name] < err["all"], err
    else:  # noise heads average out (every head is as good here; the one-SE rule prefers more heads)
        assert choice.scores["model"] > choice.scores[choice.name] + 1.0
    assert all(x < 0 for x in boundary_energy(aligns[0], [[2, 0], [3, 1]], 0.0))  # in the dips
    with pytest.raises(xl.XAttnError, match="frame levels"):
        boundary_energy(type(aligns[0])(**{**aligns[0].__dict__, "energy": None}), [[2, 0]])


def test_the_choice_is_made_once_per_model_cached_and_overridable(monkeypatch):
    from xattn_lightning.timestamps import cached_heads, choose_heads, forget_heads
    from xattn_lightning.timestamps import choice as heads_module

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    monkeypatch.setattr(heads_module, "CHOICE_UTTERANCES", 2)
    assert cached_heads(m) is None
    first = xl.word_timestamps(m, b, tokenizer=tok)
    choice = cached_heads(m)
    assert choice is not None and choice.utterances == 2

    def no_second_choice(*args, **kwargs):
        raise AssertionError("chose again")

    monkeypatch.setattr(heads_module, "choose_heads_from", no_second_choice)
    assert xl.word_timestamps(m, b, tokenizer=tok) == first  # cached: no new choice
    explicit = xl.word_timestamps(m, b, tokenizer=tok, heads=[[0, 0]])  # an explicit override still works
    assert explicit != first or choice.heads == [[0, 0]]
    monkeypatch.undo()
    forget_heads(m)
    assert cached_heads(m) is None
    c = choose_heads(m, [b], tokenizer=tok)
    assert cached_heads(m) is c and c.utterances == 2 and c.name in xl.timestamps.HEAD_SETS
    with pytest.raises(xl.XAttnError, match="heads"):
        xl.word_timestamps(m, b, tokenizer=tok, heads="best")
