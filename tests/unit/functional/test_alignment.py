"""``xattn_lightning.functional.alignment``: DTW, words, boundary errors, the length and duration priors."""

import numpy as np
import pytest
import torch

import xattn_lightning as xl
from xattn_lightning.functional.alignment import (
    alignment_matrix,
    boundary_errors,
    dtw,
    dtw_many,
    group_words,
    length_prior,
    median_filter,
    select_heads_by_agreement,
    timing_summary,
    token_times,
    with_duration_prior,
)


def test_dtw_and_median_filter_equal_transformers():
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    rng = np.random.default_rng(0)
    for shape in [(1, 7), (7, 1), (3, 5), (12, 40), (30, 150)]:
        m = rng.standard_normal(shape)
        ours, theirs = dtw(m), _dynamic_time_warping(m)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1]), shape
    x = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(median_filter(x, 7), _median_filter(x, 7))


def test_dtw_of_a_stack_equals_each_matrix_alone_and_transformers_with_ties():
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    rng = np.random.default_rng(1)
    for shape in [(4, 1, 9), (3, 9, 1), (5, 6, 30), (24, 12, 80)]:
        stack = rng.standard_normal(shape)
        stack[::2] = np.round(stack[::2])  # ties, where the tie-breaking decides the path
        for (rows, cols), m in zip(dtw_many(stack), stack, strict=True):
            theirs = _dynamic_time_warping(m)
            assert np.array_equal(rows, theirs[0]) and np.array_equal(cols, theirs[1]), shape
    with pytest.raises(xl.XAttnError, match=r"\[B, n, m\]"):
        dtw_many(np.zeros((3, 4)))
    m = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(token_times(m, 0.02, subframe=True), torch.stack([token_times(x, 0.02, True) for x in m]))


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
