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


#: the shortest subtitle cue (s): players drop cues that end where they start
MIN_CUE_SECONDS = 0.02


def display_cues(words: Sequence[Word], min_seconds: float = MIN_CUE_SECONDS) -> list[tuple[str, float, float]]:
    """The cues of :func:`to_webvtt` and :func:`to_srt`: one per word, in order, none overlapping the one before,
    each at least ``min_seconds`` long (DTW may give a word no frame of its own, and the move to silences may shrink
    one to nothing: such a word starts where the one before ends and pushes the next ones later by what it lacks,
    so no word is dropped by a player). TSV and JSON keep the timings as they are.

    >>> display_cues([("a", 0.48, 0.48), ("cat", 0.48, 0.9), ("sat", 0.9, 1.2)])
    [('a', 0.48, 0.5), ('cat', 0.5, 0.9), ('sat', 0.9, 1.2)]
    """
    out: list[tuple[str, float, float]] = []
    end = 0.0
    for w, a, b in _cues(words):
        start = max(a, end)
        end = max(b, start + min_seconds)
        out.append((w, round(start, 6), round(end, 6)))
    return out


def to_webvtt(words: Sequence[Word]) -> str:
    """A WebVTT file of one utterance, one cue per word (:func:`display_cues`)."""
    cues = [f"{i}\n{_clock(a, '.')} --> {_clock(b, '.')}\n{w}\n" for i, (w, a, b) in enumerate(display_cues(words), 1)]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_srt(words: Sequence[Word]) -> str:
    """An SRT file of one utterance, one cue per word (:func:`display_cues`)."""
    return "\n".join(
        f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{w}\n" for i, (w, a, b) in enumerate(display_cues(words), 1)
    )
