"""``xattn_lightning.functional.silence``: silent spans and boundaries moved to them."""

import torch

from xattn_lightning.functional.silence import silent_spans, snap_to_silence


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


def test_silence_filling_most_of_the_input_is_still_found():
    # 3 s of leading silence before 1 s of speech: the median of all frames is the floor itself
    e = torch.cat([torch.full((300,), -1.0), torch.full((100,), 4.0)])
    e[330:340] = 2.0  # louder than the silence threshold
    assert silent_spans(e, 0.01) == [(0.0, 3.0)]
    g = torch.Generator().manual_seed(0)
    noisy = e + 0.2 * torch.rand(400, generator=g)  # a noise floor, not digital silence
    assert silent_spans(noisy, 0.01) == [(0.0, 3.0)]


def test_a_long_pause_draws_boundaries_from_further_than_a_short_one():
    words = [("a", 0.0, 0.9), ("b", 0.9, 2.5), ("c", 2.5, 3.0)]
    assert snap_to_silence(words, [(1.2, 2.2)])[:2] == [("a", 0.0, 1.2), ("b", 2.2, 2.5)]  # 0.3 s away, a 1-s pause
    assert snap_to_silence(words, [(1.2, 1.28)]) == words  # 0.3 s away from a short pause: left alone
    assert snap_to_silence(words, [(1.35, 2.05)]) == words  # 0.45 s from both boundaries: left alone
