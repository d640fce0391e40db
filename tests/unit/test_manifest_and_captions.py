"""Manifests without a text column (word timestamps transcribe the audio themselves), subtitle cues a player keeps,
and long audio cut at quiet points."""

import pytest
import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.functional.silence import quiet_cuts
from xattn_lightning.timestamps import captions


def test_a_manifest_without_text_is_read_where_the_text_is_not_needed(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "m.tsv").write_text("id\taudio\nu1\ta.wav\n")
    rows = read_manifest(tmp_path / "m.tsv", text_required=False)
    assert [(r.id, r.audio.name, r.text) for r in rows] == [("u1", "a.wav", "")]  # the header is not a row
    with pytest.raises(xl.XAttnError, match=r"m.tsv:2: expected 3 tab-separated fields"):
        read_manifest(tmp_path / "m.tsv")
    (tmp_path / "one.tsv").write_text("u1\n")
    with pytest.raises(xl.XAttnError, match=r"expected 2 or 3 tab-separated fields"):
        read_manifest(tmp_path / "one.tsv", text_required=False)


def test_subtitle_cues_last_at_least_20_ms_in_order_and_never_overlap():
    words = [("a", 0.48, 0.48), ("big", 0.48, 0.48), ("cat", 0.48, 0.9), ("sat", 1.0, 0.95), ("on", 1.2, 1.5)]
    cues = captions.display_cues(words)
    assert [w for w, _, _ in cues] == ["a", "big", "cat", "sat", "on"]  # no word dropped
    assert all(b - a >= captions.MIN_CUE_SECONDS - 1e-9 for _, a, b in cues)
    assert all(prev[2] <= nxt[1] + 1e-9 for prev, nxt in zip(cues, cues[1:]))
    assert cues[-1] == ("on", 1.2, 1.5)  # a word long enough is left as it is
    srt = captions.to_srt(words)
    assert "00:00:00,480 --> 00:00:00,500\na\n" in srt and "00:00:00,500 --> 00:00:00,520\nbig\n" in srt
    assert "-->" in captions.to_webvtt(words) and captions.to_tsv({"u": words}).count("0.480\t0.480") == 2  # TSV: as timed


def test_long_audio_is_cut_in_its_quietest_frames_into_pieces_within_the_window():
    sr = 100
    g = torch.Generator().manual_seed(0)
    wav = 1 + torch.rand(95 * sr, generator=g)
    pauses = [27.3, 50.1, 76.0]
    for p in pauses:
        wav[int(p * sr) : int(p * sr) + 10] = 0
    cuts = quiet_cuts(wav, sr, max_seconds=30, search_seconds=8, frame_seconds=0.1)
    assert cuts[0][0] == 0 and cuts[-1][1] == wav.numel()
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous, nothing lost
    assert all(0 < b - a <= 30 * sr for a, b in cuts)
    assert len(cuts) == 4 and all(p <= b / sr <= p + 0.1 for p, (_, b) in zip(pauses, cuts))  # each in a pause
    assert quiet_cuts(wav[: 20 * sr], sr) == [(0, 20 * sr)]
    with pytest.raises(ValueError, match="max_seconds"):
        quiet_cuts(wav, sr, max_seconds=0)
