"""Audio reading, resampling, filterbanks and TSV manifests (no FFmpeg needed)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError


@dataclass
class ManifestRow:
    """One manifest line: utterance id, absolute audio path, reference text."""

    id: str
    audio: Path
    text: str
    #: true word timings ``(word, start_s, end_s)`` from a ``words`` column (JSON), when the manifest has one
    words: list[tuple[str, float, float]] | None = None


def read_manifest(path: str | Path, check_files: bool = True, text_required: bool = True) -> list[ManifestRow]:
    """Read a TSV manifest ``id<TAB>audio<TAB>text`` (an optional header line ``id audio text``);
    audio paths are relative to the manifest's folder. A header ``id audio text words`` adds a
    fourth column: a JSON list of ``[word, start_s, end_s]`` (true word timings) per utterance.
    ``text_required=False``: ``id<TAB>audio`` rows (header ``id audio``) are read too, with an empty text (for
    what transcribes the audio itself, as word timestamps).

    Raises :class:`~xattn_lightning.errors.XAttnError` naming the line of a malformed row or a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise XAttnError(f"Manifest {str(path)!r} does not exist; pass a TSV file with lines 'id<TAB>audio<TAB>text'.")
    rows: list[ManifestRow] = []
    has_words = False
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, rec in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not rec or all(not c.strip() for c in rec):
                continue
            head = [c.strip().lower() for c in rec]
            if lineno == 1 and head[:2] == ["id", "audio"] and (len(head) < 3 or head[2] == "text"):
                has_words = len(rec) > 3 and head[3] == "words"
                continue
            if len(rec) < (3 if text_required else 2) or not rec[0].strip() or not rec[1].strip():
                fields = "3 tab-separated fields 'id<TAB>audio<TAB>text'" if text_required else (
                    "2 or 3 tab-separated fields 'id<TAB>audio[<TAB>text]'")
                raise XAttnError(f"{path}:{lineno}: expected {fields} but got {len(rec)}: {rec!r}.")
            audio = (path.parent / rec[1].strip()).resolve()
            if check_files and not audio.is_file():
                raise XAttnError(f"{path}:{lineno}: audio file {str(audio)!r} does not exist.")
            if has_words:
                rows.append(ManifestRow(rec[0].strip(), audio, rec[2].strip(), _words(rec, path, lineno)))
            else:
                rows.append(ManifestRow(rec[0].strip(), audio, "\t".join(rec[2:]).strip()))
    if not rows:
        raise XAttnError(f"Manifest {str(path)!r} has no utterances.")
    return rows


def _words(rec: list[str], path: Path, lineno: int) -> list[tuple[str, float, float]]:
    import json

    try:
        words = [(str(w), float(a), float(b)) for w, a, b in json.loads(rec[3])]
    except (IndexError, ValueError, TypeError) as err:
        raise XAttnError(
            f"{path}:{lineno}: the words column must be a JSON list of [word, start_s, end_s] ({err})."
        ) from None
    return words


def load_audio(path: str | Path, sampling_rate: int = 16000) -> Tensor:
    """Read a WAV/FLAC/OGG file with soundfile, mix to mono and resample with torchaudio.

    Returns a float32 ``Tensor[samples]``.
    """
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise XAttnError(f"Cannot read audio {str(path)!r}: {err}") from err
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    return resample(wav, sr, sampling_rate)


def resample(wav: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Resample a 1-D waveform with ``torchaudio.functional.resample`` (no-op if equal rates)."""
    if orig_sr == new_sr:
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, orig_sr, new_sr)


def fbank(wav: Tensor, sampling_rate: int = 16000, num_mel_bins: int = 80, normalize: bool = True) -> Tensor:
    """Kaldi-compatible log-Mel filterbanks ``[T, num_mel_bins]`` (25 ms window, 10 ms hop), with
    utterance-level mean/variance normalisation (as S2T models expect) when ``normalize``.

    >>> fbank(torch.randn(16000)).shape
    torch.Size([98, 80])
    """
    import torchaudio.compliance.kaldi as kaldi

    if wav.numel() < int(0.025 * sampling_rate):
        raise XAttnError(f"Audio of {wav.numel()} samples is shorter than one 25-ms frame.")
    feats = kaldi.fbank(
        wav.reshape(1, -1) * 32768.0, num_mel_bins=num_mel_bins, sample_frequency=sampling_rate, dither=0.0
    )
    if normalize:
        std = feats.std(0, keepdim=True)
        feats = (feats - feats.mean(0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    return feats
