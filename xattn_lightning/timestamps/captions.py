"""Word timings as files: TSV, JSON, and WebVTT/SRT with one cue per word (pure functions, no model).

Example:
    >>> words = {"utt1": [("The", 0.02, 0.14), ("weather", 0.14, 0.5)]}
    >>> to_tsv(words).splitlines()[1].split()
    ['utt1', 'The', '0.020', '0.140']
    >>> print(to_webvtt(words["utt1"]).splitlines()[3])
    00:00:00.020 --> 00:00:00.140
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from xattn_lightning.functional.alignment import Word

FORMATS: tuple[str, ...] = ("tsv", "json", "vtt", "srt")


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cues(words: Sequence[Word]) -> list[tuple[str, float, float]]:
    """One cue per word; a cue never ends before it starts (DTW may give a word no frame of its own)."""
    return [(w.strip(), float(a), max(float(a), float(b))) for w, a, b in words if w.strip()]


def to_tsv(words: Mapping[str, Sequence[Word]]) -> str:
    """``id word start end`` per word (seconds, millisecond precision), with a header line."""
    lines = ["id\tword\tstart\tend"]
    lines += [f"{uid}\t{w}\t{a:.3f}\t{b:.3f}" for uid, ws in words.items() for w, a, b in _cues(ws)]
    return "\n".join(lines) + "\n"


def to_json(words: Mapping[str, Sequence[Word]]) -> str:
    """``{id: [{"word", "start", "end"}, ...]}``."""
    out = {
        uid: [{"word": w, "start": round(a, 3), "end": round(b, 3)} for w, a, b in _cues(ws)]
        for uid, ws in words.items()
    }
    return json.dumps(out, indent=1, ensure_ascii=False) + "\n"


def to_webvtt(words: Sequence[Word]) -> str:
    """A WebVTT file of one utterance, one cue per word."""
    cues = [f"{i}\n{_clock(a, '.')} --> {_clock(b, '.')}\n{w}\n" for i, (w, a, b) in enumerate(_cues(words), 1)]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_srt(words: Sequence[Word]) -> str:
    """An SRT file of one utterance, one cue per word."""
    return "\n".join(
        f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{w}\n" for i, (w, a, b) in enumerate(_cues(words), 1)
    )
