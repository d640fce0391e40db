"""``xattn_lightning.timestamps.choice``: the default head set, chosen once per model without labels."""

import pytest
import torch
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl


def _planted_alignment(seed: int, lower: str = "late"):
    """An utterance of 8 one-token words whose true boundaries are dips of the input's level; layers 2-3 of a
    4-layer × 2-head model attend to each word's true span (planted diagonal heads), layers 0-1 to the span 12
    frames later (``lower="late"``: as sharp, but late), 5 frames earlier (``"early"``: 100 ms, still on most of the
    word, where the drop in place alone hardly tells them apart) or at random (``"noise"``), all with some noise."""
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
        lag = -5 if lower == "early" else 12
        ca[:2, :, j, min(max(s + lag, 0), frames - 1) : min(max(e + lag, 1), frames)] += 1.0
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


def _start_reader(planted):
    """A stand-in for ``span_contrast`` on planted utterances: the model reads each word at its start (the first 60 %
    of its true span), so occluding a span drops the word by the share of that part it covers; the criterion is the
    drop in place less the drop with the span moved ``CHOICE_LATER_SECONDS`` later."""
    from xattn_lightning.timestamps import CHOICE_LATER_SECONDS, ensemble_words

    def drop(s, e, ts, te):
        read = ts + 0.6 * (te - ts)
        return max(0.0, min(e, read) - max(s, ts)) / (read - ts)

    def scores(i, head_sets):
        a, true = planted[i]
        later = CHOICE_LATER_SECONDS
        return [
            drop(s, e, ts, te) - drop(s + later, e + later, ts, te)
            for (_, s, e), (_, ts, te) in zip(ensemble_words(a, head_sets), true)
        ]

    return scores


@pytest.mark.parametrize("lower", ["late", "early", "noise"])
def test_the_criterion_picks_the_planted_diagonal_heads_over_late_early_or_noise_heads(lower):
    from xattn_lightning.timestamps import choose_heads_from, ensemble_words

    planted = [_planted_alignment(seed, lower) for seed in range(3)]
    aligns = [a for a, _ in planted]
    choice = choose_heads_from(aligns, shipped=[[0, 0], [1, 1]], scores=_start_reader(planted))  # shipped: lower heads
    assert set(choice.candidates) == {"all", "upper_half", "model", "consistent"}
    sets = xl.timestamps.candidate_sets(choice.candidates)
    assert set(choice.scores) == set(sets) == {*choice.candidates, "all+consistent"}
    assert sets["all+consistent"] == [choice.candidates["all"], choice.candidates["consistent"]]
    truth = [t for _, t in planted]
    err = {n: xl.timestamps.timing_scores([ensemble_words(a, hs) for a in aligns], truth)["mae_ms"] for n, hs in sets.items()}
    assert choice.name != "model" and err[choice.name] == min(err.values()), (choice, err)  # the best aligner
    assert choice.head_sets == sets[choice.name]
    if lower in ("late", "early"):  # averaged in, late or early heads move the boundaries: only the planted are right
        assert choice.name in ("upper_half", "consistent") and all(li >= 2 for li, _ in choice.heads), choice
        assert choice.scores[choice.name] > max(choice.scores["all"], choice.scores["model"]) + 0.1
        assert err[choice.name] < min(err["all"], err["all+consistent"]), err
    else:  # noise heads average out (every head is as good here; the one-SE rule prefers more heads)
        assert choice.scores["model"] < choice.scores[choice.name] - 0.3
    with pytest.raises(xl.XAttnError, match="paired"):
        choose_heads_from(aligns, scores=lambda i, hs: [1.0] * len(hs))  # word counts that differ by candidate


def test_span_drops_are_each_words_log_prob_drop_when_its_span_is_zeroed_and_the_contrast_moves_it_later():
    from xattn_lightning.functional.alignment import group_words
    from xattn_lightning.timestamps import (
        CHOICE_LATER_SECONDS,
        alignment_from,
        ensemble_words,
        span_contrast,
        span_drops,
        span_occluder,
    )

    m = speaking_tiny_whisper()
    ad = xl.adapter_for(m)
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    e = xl.explain(ad, b, tokenizer=tok)[0]
    a = alignment_from(e)
    u = ad.utterances(ad.model_batch(b))[0]
    enc = ad.encode(u.features.unsqueeze(0))
    heads = [[[1, 0], [1, 1]]]
    got = span_drops(ad, a, enc, heads)
    later = span_drops(ad, a, enc, heads, shift=CHOICE_LATER_SECONDS)
    words, groups = ensemble_words(a, heads), group_words(a.pieces)
    assert len(got) == len(later) == len(words) == len(groups) > 1
    ids = a.decoder_ids

    def word_logp(h, k):  # by hand: decode the whole sequence, sum the word's tokens' log-probs
        logp = torch.log_softmax(ad.decode(h, ids[:-1].unsqueeze(0)).logits.float(), -1)[0]
        return sum(float(logp[a.num_prompt + i - 1, ids[a.num_prompt + i]].detach()) for i in groups[k])

    moved, frames = round(CHOICE_LATER_SECONDS / a.frame_seconds), a.cross_attention.shape[-1]  # the speech's
    for k, (_, start, end) in enumerate(words):
        f0 = int(start / a.frame_seconds)
        f1 = max(int(round(end / a.frame_seconds)), f0 + 1)
        for shift, want in ((0, got[k]), (moved, later[k])):
            g0 = min(f0 + shift, frames - 1)  # moved past the speech's end: cut there
            h = enc.clone()
            h[:, g0 : min(max(f1 + shift, g0 + 1), frames)] = 0.0
            assert want == pytest.approx(word_logp(enc, k) - word_logp(h, k), abs=1e-4)
    contrast = span_contrast(ad, a, enc, heads)
    assert contrast == pytest.approx([d - m for d, m in zip(got, later)]) and contrast != pytest.approx(got)
    scores = span_occluder(ad, [a], [u.features])
    assert scores(0, heads) == pytest.approx(contrast) and scores(0, heads) is scores(0, heads)  # memoised
    assert span_occluder(ad, [a], [u.features], later=None)(0, heads) == pytest.approx(got)  # the drop in place
    with pytest.raises(xl.XAttnError, match="features of 2"):
        span_occluder(ad, [a], [u.features, u.features])


def test_the_choice_is_made_once_per_model_cached_and_overridable(monkeypatch):
    from xattn_lightning.timestamps import cached_heads, choose_heads, forget_heads
    from xattn_lightning.timestamps import choice as heads_module

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    with monkeypatch.context() as mp:
        mp.setattr(heads_module, "CHOICE_UTTERANCES", 2)
        assert cached_heads(m) is None
        first = xl.word_timestamps(m, b, tokenizer=tok)
        choice = cached_heads(m)
        assert choice is not None and choice.utterances == 2
        mp.setattr(heads_module, "choose_heads_from", _no_choice)
        assert xl.word_timestamps(m, b, tokenizer=tok) == first  # cached: no new choice
        explicit = xl.word_timestamps(m, b, tokenizer=tok, heads=[[0, 0]])  # an explicit override still works
        assert explicit != first or choice.heads == [[0, 0]]
    forget_heads(m)
    assert cached_heads(m) is None
    c = choose_heads(m, [b], tokenizer=tok)
    assert cached_heads(m) is c and c.utterances == 2 and c.name in (*xl.timestamps.HEAD_SETS, *xl.timestamps.ENSEMBLES)
    with pytest.raises(xl.XAttnError, match="head rule"):
        xl.word_timestamps(m, b, tokenizer=tok, heads="best")


def test_an_ensemble_averages_the_boundaries_of_its_head_sets_then_moves_them_to_silences_once():
    from xattn_lightning.timestamps import TimingOptions, alignment_words, ensemble_words

    a, _ = _planted_alignment(0)
    a.silences = [(0.4, 0.5)]
    refined = TimingOptions(duration_prior=0.5, silence=True)
    upper, lower = [[2, 0], [3, 1]], [[0, 0], [1, 1]]
    for timing in (TimingOptions(), refined):
        assert ensemble_words(a, [upper], timing=timing) == alignment_words(a, upper, timing=timing)  # one set: the same
    each = [alignment_words(a, h) for h in (upper, lower)]
    mean = ensemble_words(a, [upper, lower])
    assert [w for w, _, _ in mean] == [w for w, _, _ in each[0]]
    for k, (_, s, e) in enumerate(mean):
        assert s == pytest.approx((each[0][k][1] + each[1][k][1]) / 2) and e == pytest.approx((each[0][k][2] + each[1][k][2]) / 2)
    from xattn_lightning.functional.silence import snap_to_silence

    unsnapped = ensemble_words(a, [upper, lower], timing=TimingOptions(duration_prior=0.5))
    assert ensemble_words(a, [upper, lower], timing=refined) == snap_to_silence(unsnapped, a.silences)
    with pytest.raises(xl.XAttnError, match="head set"):
        ensemble_words(a, [])


def test_the_default_times_with_every_head_set_of_a_chosen_ensemble(monkeypatch):
    from xattn_lightning.functional.alignment import DURATION_PRIOR
    from xattn_lightning.timestamps import HeadChoice, TimingOptions, align, ensemble_words, forget_heads
    from xattn_lightning.timestamps import choice as heads_module

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    forget_heads(m)
    every = [[0, 0], [0, 1], [1, 0], [1, 1]]
    ens = HeadChoice("all+consistent", every, {"all": every, "consistent": [[1, 0]]}, {}, 2, head_sets=[every, [[1, 0]]])
    monkeypatch.setattr(heads_module, "choose_for", lambda adapter, aligns, features: ens)
    got = xl.word_timestamps(m, b, tokenizer=tok)
    timing = TimingOptions(duration_prior=DURATION_PRIOR, silence=True)
    assert got == [ensemble_words(a, [every, [[1, 0]]], timing=timing) for a in align(m, b, tokenizer=tok)]
    assert xl.word_timestamps(m, b, tokenizer=tok, heads="all+consistent") == got
    with pytest.raises(xl.XAttnError, match="weights"):
        xl.word_timestamps(m, b, tokenizer=tok, weights=[1.0, 1.0, 1.0, 1.0])
    assert HeadChoice("all", every, {"all": every}, {}, 1).head_sets == [every]  # a single set: itself


def _no_choice(*args, **kwargs):
    raise AssertionError("chose again")


def test_a_final_choice_is_kept_on_disk_and_read_back_by_the_same_weights_only(monkeypatch, tmp_path):
    import copy

    from xattn_lightning.timestamps import cached_heads, forget_heads, heads_cache_file
    from xattn_lightning.timestamps import choice as heads_module

    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(heads_module, "CHOICE_UTTERANCES", 2)
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    fresh = copy.deepcopy(m)  # the same weights, as a new process would load them
    path = heads_cache_file(m)
    assert path is not None and path.startswith(str(tmp_path)) and heads_cache_file(fresh) == path
    first = xl.word_timestamps(m, b, tokenizer=tok)
    assert cached_heads(m).utterances == 2 and (tmp_path / "heads").is_dir()

    with monkeypatch.context() as mp:  # the copy reads the choice back: no occlusion, the same words
        mp.setattr(heads_module, "choose_heads_from", _no_choice)
        kept = cached_heads(fresh)
        assert kept is not None and kept == cached_heads(m) and kept is not cached_heads(m)
        assert xl.word_timestamps(fresh, b, tokenizer=tok) == first

    other = copy.deepcopy(m)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # a training step later: another model
    assert heads_cache_file(other) != path and cached_heads(other) is None

    forget_heads(fresh)  # forgets on disk too
    assert cached_heads(copy.deepcopy(m)) is None


def test_a_partial_choice_is_not_kept_on_disk_and_the_cache_can_be_turned_off(monkeypatch, tmp_path):
    import copy

    from xattn_lightning.timestamps import cached_heads, heads_cache_file

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(tmp_path))
    xl.word_timestamps(m, b, tokenizer=tok)  # 2 of the 8 choosing utterances: chosen, not final
    assert cached_heads(m).utterances == 2 and cached_heads(copy.deepcopy(m)) is None
    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", "off")
    off = copy.deepcopy(m)
    assert heads_cache_file(off) is None
    xl.timestamps.choose_heads(off, [b], tokenizer=tok)
    assert cached_heads(off).utterances == 2 and not list(tmp_path.rglob("*.json"))


def test_an_unreadable_or_unwritable_cache_is_warned_about_and_chosen_around(monkeypatch, tmp_path):
    import copy
    from pathlib import Path

    from xattn_lightning.timestamps import cached_heads, choose_heads, heads_cache_file

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(tmp_path))
    path = Path(heads_cache_file(copy.deepcopy(m)))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert cached_heads(m) is None
    c = choose_heads(m, [b], tokenizer=tok)  # written over
    assert cached_heads(copy.deepcopy(m)) == c

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(blocked))  # a directory cannot be made there
    m2 = copy.deepcopy(m)
    with pytest.warns(UserWarning, match="Could not write the cache file"):
        c2 = choose_heads(m2, [b], tokenizer=tok)
    assert cached_heads(m2) is c2 and c2 == c


def test_choosing_runs_the_encoder_once_per_utterance(monkeypatch):
    from xattn_lightning.timestamps import cached_heads
    from xattn_lightning.timestamps import choice as heads_module

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    calls = []
    m.model.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0] if args else 1))
    monkeypatch.setattr(heads_module, "CHOICE_UTTERANCES", 2)
    xl.word_timestamps(m, b, tokenizer=lambda i: f" w{i}")
    assert cached_heads(m).utterances == 2
    assert sum(calls) == 2  # the choice's occlusions reuse the encodings of the timing pass
