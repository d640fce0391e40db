"""``xl.audio_word_timestamps``: audio of any length, from files or waveforms, timed piece by piece."""

from pathlib import Path

import pytest
import torch
from helpers import speaking_tiny_whisper, tiny_extractor

import xattn_lightning as xl
from xattn_lightning.functional.silence import quiet_cuts
from xattn_lightning.loading import features_from_audio
from xattn_lightning.timestamps import SILENT_PEAK, cached_heads, heads_cache_file

SR = 16000
TOK = lambda i: f" w{i}"  # noqa: E731


def _noise(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * SR), generator=g)


def test_audio_longer_than_the_window_is_timed_piece_by_piece_and_shifted_back():
    m, ext = speaking_tiny_whisper(), tiny_extractor()  # a 2-s window
    wav = _noise(4.6)
    wav[int(1.7 * SR) : int(1.8 * SR)] *= 0.01  # a pause to cut in
    out = xl.audio_word_timestamps(m, [wav], processor=ext, tokenizer=TOK, heads="all")[0]
    cuts = quiet_cuts(wav, SR, 2.0)
    assert len(cuts) == 3 and 1.7 <= cuts[0][1] / SR <= 1.8  # cut in the pause
    assert out.pieces == [(a / SR, b / SR) for a, b in cuts] and out.seconds == pytest.approx(4.6) and not out.silent
    want = []
    for a, b in cuts:  # each piece timed on its own, its times shifted by where it starts
        got = xl.word_timestamps(m, features_from_audio(ext, [wav[a:b]]), tokenizer=TOK, heads="all")[0]
        want += [(w, round(s + a / SR, 6), round(e + a / SR, 6)) for w, s, e in got]
    assert out.words == want
    assert max(e for _, _, e in out.words) > 2.0  # past the window: nothing after 2 s is lost
    ends = [e for _, _, e in out.words]
    assert all(x <= y + 1e-9 for x, y in zip(ends, ends[1:]))


def test_silent_pieces_get_no_words_and_a_long_silence_is_not_cut_into_frames():
    m, ext = speaking_tiny_whisper(), tiny_extractor()
    wav = torch.cat([torch.zeros(int(4.5 * SR)), _noise(1.5)])
    out = xl.audio_word_timestamps(m, wav, processor=ext, tokenizer=TOK, heads="all")[0]  # one waveform: one input
    assert len(out.pieces) == 4  # the silence cut near the window's end, not every 25 ms
    assert out.silent == out.pieces[:2] and out.pieces[2][0] <= 4.5  # the pieces holding only zeros
    assert out.words and all(s >= out.pieces[2][0] - 1e-9 for _, s, _ in out.words)
    quiet = xl.audio_word_timestamps(m, [0.5 * SILENT_PEAK * torch.ones(SR)], processor=ext, tokenizer=TOK, heads="all")
    assert quiet[0].words == [] and quiet[0].silent == [(0.0, 1.0)]


def test_the_default_head_set_is_chosen_once_on_the_first_pieces_and_kept(tmp_path, monkeypatch):
    import soundfile as sf

    from xattn_lightning.timestamps import choice as choice_module

    made = []
    real = choice_module.choose_heads_from
    monkeypatch.setattr(choice_module, "choose_heads_from", lambda *a, **k: made.append(1) or real(*a, **k))

    m, ext = speaking_tiny_whisper(), tiny_extractor()
    paths = []
    for i in range(4):  # 4 files of 2 pieces: the 8 pieces a choice is made on
        paths.append(tmp_path / f"a{i}.wav")
        sf.write(paths[-1], _noise(3.5, seed=i).numpy(), SR)
    first = xl.audio_word_timestamps(m, paths, processor=ext, tokenizer=TOK)
    choice = cached_heads(m)
    assert choice is not None and choice.utterances == 8
    assert len(made) == 1  # one choice, on the 8 pieces timed together (not again at 1, 2, 4 and 8 pieces)
    assert Path(heads_cache_file(m)).is_file()  # final: kept on disk
    again = xl.audio_word_timestamps(m, [str(p) for p in paths], processor=ext, tokenizer=TOK)
    assert [a.words for a in again] == [f.words for f in first]  # every piece was timed with the final set


def test_bad_audio_and_arguments_are_refused_with_what_to_do(tmp_path):
    m, ext = speaking_tiny_whisper(), tiny_extractor()
    kw = {"processor": ext, "tokenizer": TOK, "heads": "all"}
    with pytest.raises(xl.XAttnError, match=r"shape \(2, 16000\); pass a mono waveform"):
        xl.audio_word_timestamps(m, [torch.zeros(2, SR)], **kw)
    with pytest.raises(xl.XAttnError, match="shorter than 25 ms"):
        xl.audio_word_timestamps(m, [torch.zeros(100)], **kw)
    with pytest.raises(xl.XAttnError, match="NaN"):
        xl.audio_word_timestamps(m, [torch.full((SR,), float("nan"))], **kw)
    with pytest.raises(xl.XAttnError, match=r"missing.wav' does not exist; pass an audio file"):
        xl.audio_word_timestamps(m, [tmp_path / "missing.wav"], **kw)
    with pytest.raises(xl.XAttnError, match="is a directory"):
        xl.audio_word_timestamps(m, [tmp_path], **kw)
    with pytest.raises(xl.XAttnError, match="float64.*|complex"):
        xl.audio_word_timestamps(m, [torch.zeros(SR, dtype=torch.complex64)], **kw)
    with pytest.raises(xl.XAttnError, match="Unknown head rule 'bogus'. Valid head rules are"):
        xl.audio_word_timestamps(m, [_noise(1)], processor=ext, tokenizer=TOK, heads="bogus")
    with pytest.raises(xl.XAttnError, match="duration_prior to be a number"):
        xl.audio_word_timestamps(m, [_noise(1)], duration_prior="x", **kw)
    with pytest.raises(xl.XAttnError, match="2 audio inputs but 1 texts"):
        xl.audio_word_timestamps(m, [_noise(1), _noise(1)], texts=["a b"], **kw)
    with pytest.raises(xl.XAttnError, match="'talk' is 4.6 s, longer than the model's 2-s window"):
        xl.audio_word_timestamps(m, [_noise(4.6)], texts=["a b"], names=["'talk'"], **kw)
    with pytest.raises(xl.XAttnError, match="int64.*int16 or int32"):
        xl.audio_word_timestamps(m, [torch.zeros(SR, dtype=torch.int64)], **kw)
    for rate in (0, "44100"):
        with pytest.raises(xl.XAttnError, match="sampling_rate must be a positive whole number"):
            xl.audio_word_timestamps(m, [_noise(1)], sampling_rate=rate, **kw)
    with pytest.raises(xl.XAttnError, match="max_seconds must be positive"):
        xl.audio_word_timestamps(m, [_noise(1)], max_seconds=0, **kw)


def test_integer_and_other_rate_waveforms_are_scaled_and_resampled_as_files_are(tmp_path):
    import soundfile as sf

    m, ext = speaking_tiny_whisper(), tiny_extractor()
    kw = {"processor": ext, "tokenizer": TOK, "heads": "all"}
    wav = _noise(1.5).clamp(-1, 1)
    pcm = (wav * 32767).round().to(torch.int16)
    sf.write(tmp_path / "a.wav", pcm.numpy(), SR, subtype="PCM_16")
    from_file = xl.audio_word_timestamps(m, tmp_path / "a.wav", **kw)[0]
    assert xl.audio_word_timestamps(m, [pcm.numpy()], **kw)[0].words == from_file.words  # int16 scaled as read
    assert xl.audio_word_timestamps(m, [pcm.float() / 32768], **kw)[0].words == from_file.words
    sf.write(tmp_path / "b.wav", wav.numpy(), 8000)  # the same samples, declared at 8 kHz: 3 s
    slow = xl.audio_word_timestamps(m, [tmp_path / "b.wav"], **kw)[0]
    as_array = xl.audio_word_timestamps(m, [wav], sampling_rate=8000, **kw)[0]
    assert slow.seconds == as_array.seconds == pytest.approx(3.0) and slow.pieces == as_array.pieces
    assert all(round(t, 6) == t for _, a, b in slow.words for t in (a, b))  # no 0.9400000000000001
    with pytest.raises(xl.XAttnError, match="2 audio inputs but 1 texts"):  # a bare text is one text, not 3
        xl.audio_word_timestamps(m, [wav, wav], texts="a b", **kw)


def test_while_choosing_the_first_pieces_are_short(monkeypatch):
    from xattn_lightning.timestamps import audio as audio_module

    monkeypatch.setattr(audio_module, "CHOICE_PIECE_SECONDS", 0.8)  # the tiny model's window is 2 s
    m, ext = speaking_tiny_whisper(), tiny_extractor()
    out = xl.audio_word_timestamps(m, [_noise(12.0)], processor=ext, tokenizer=TOK)[0]
    lengths = [b - a for a, b in out.pieces]
    assert all(x <= 0.8 + 1e-9 for x in lengths[:8]) and max(lengths[8:]) > 0.8  # then the whole window
    assert out.pieces[-1][1] == pytest.approx(12.0) and cached_heads(m).utterances == 8
    assert "chosen on 8 utterances; kept in" in xl.timestamps.heads_report(m)
    again = xl.audio_word_timestamps(m, [_noise(12.0)], processor=ext, tokenizer=TOK)[0]
    assert max(b - a for a, b in again.pieces) > 0.8 and again.pieces[0][1] > 0.8  # chosen: window-long pieces
