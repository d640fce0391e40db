"""Word timestamps and alignment heads: the maths against transformers, selection, the real model."""


import numpy as np
import pytest
import torch
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.functional.alignment import (
    alignment_matrix,
    boundary_errors,
    dtw,
    group_words,
    median_filter,
    timing_summary,
)
from xattn_lightning.timestamps import align, alignment_token_times, select_heads_by_agreement


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


def test_default_word_timestamps_choose_heads_per_utterance_and_fuse_saliency():
    from xattn_lightning.timestamps import FUSION_WEIGHT, alignment_from, alignment_words

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    got = xl.word_timestamps(m, b, tokenizer=tok, n_masks=16)
    exps = xl.explain(m, b, methods=("encoder_spes",), tokenizer=tok, n_masks=16)
    want = [
        alignment_words(
            alignment_from(e), select_heads_by_agreement(e.agreement_grid("encoder_spes")), fusion=FUSION_WEIGHT
        )
        for e in exps
    ]
    assert got == want
    with pytest.raises(xl.XAttnError, match="fusion"):
        alignment_token_times(alignment_from(exps[0]), method="transformers", fusion=0.2)


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
    whole = xl.word_timestamps(m, b, tokenizer=tok, heads=None)[0]
    sub = xl.word_timestamps(m, b, tokenizer=tok, heads=None, subframe=True)[0]
    assert [w for w, _, _ in sub] == [w for w, _, _ in whole]
    assert all(abs(s / 0.02 - round(s / 0.02)) < 1e-6 for _, s, _ in whole)  # DTW: whole frames
    starts = [s for _, s, _ in sub]
    assert starts == sorted(starts)
    assert all(abs(a[1] - b_[1]) <= 0.02 + 1e-9 for a, b_ in zip(sub, whole))
