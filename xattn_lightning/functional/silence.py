"""Silent stretches of an utterance's input and word boundaries moved to them.

Pure functions (no model): find silent spans from per-frame energies of the input features, and move word
boundaries that DTW placed next to a silence to its edges (DTW gives every frame to some word, so a pause is
otherwise split between its neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xattn_lightning.functional.alignment import Word

#: a frame is silent below the floor plus this share of the way to the median level; silent spans last at least
#: ``SILENCE_MIN_SECONDS``; a boundary moves to a span within ``SILENCE_WINDOW_SECONDS``. Chosen on timed speech
#: of three voices (docs/timestamps.md, "A duration prior and silences")
SILENCE_LEVEL = 0.3
SILENCE_MIN_SECONDS = 0.02
SILENCE_WINDOW_SECONDS = 0.04
#: a longer silence draws boundaries from further: up to this share of its length, at most
#: ``SILENCE_WINDOW_MAX_SECONDS`` (a word spanning a pause of a second is wrong; on human speech joined with 1-s
#: pauses, DTW put 6 of 126 such boundaries 0.1-0.35 s before the pause, and the 40-ms window moved none;
#: unchanged error on timed speech: docs/timestamps.md, "A duration prior and silences")
SILENCE_WINDOW_SHARE = 0.5
SILENCE_WINDOW_MAX_SECONDS = 0.4


def silent_spans(
    energy: Tensor,
    frame_seconds: float = 0.01,
    level: float = SILENCE_LEVEL,
    min_seconds: float = SILENCE_MIN_SECONDS,
) -> list[tuple[float, float]]:
    """Silent stretches ``(start_s, end_s)`` of an utterance from its frame energies ``[T]`` (e.g. the mean
    of the log-mel features of each input frame): frames below ``floor + level × (speech − floor)`` (floor:
    the quietest frame; speech: the median of the frames at least half-way from the floor to the loudest), in runs
    of at least ``min_seconds``. Trailing frames all equal to the quietest value are padding (Whisper pads every
    input to 30 s with digital silence): silent, and left out of the floor and the speech level, so that a noise
    floor in the speech is not measured against the padding's. (The speech level is not the median of all frames:
    where silence fills half the input or more, that median is the floor itself and no silence is found.)

    >>> silent_spans(torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 0.0]), 0.01)
    [(0.0, 0.03), (0.12, 0.14)]
    >>> silent_spans(torch.tensor([1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0, -3.0, -3.0, -3.0]), 0.01)
    [(0.0, 0.02), (0.05, 0.07), (0.09, 0.12)]
    """
    e = torch.as_tensor(energy).double().flatten()
    if e.numel() == 0:
        return []
    n = first = int(e.numel())  # the padding starts at frame `first`
    while first > 0 and float(e[first - 1]) == float(e[-1]):
        first -= 1
    if n - first < 2 or float(e[-1]) > float(e.min()):
        first = n  # padding repeats the quietest value
    speech = e[:first] if first >= 2 else e
    floor = float(speech.min())
    loud = speech[speech >= floor + 0.5 * (float(speech.max()) - floor)]
    silent = (e < floor + level * (float(loud.median()) - floor)).tolist()
    silent[first:] = [True] * (n - first)
    spans, start = [], None
    for i, s in enumerate([*silent, False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            if (i - start) * frame_seconds >= min_seconds - 1e-9:
                spans.append((round(start * frame_seconds, 6), round(i * frame_seconds, 6)))
            start = None
    return spans


def snap_to_silence(
    words: Sequence[Word], spans: Sequence[tuple[float, float]], window: float = SILENCE_WINDOW_SECONDS
) -> list[Word]:
    """Words whose boundaries next to a silence move to its edges: where two words meet within ``window``
    seconds of a silent span (:func:`silent_spans`; of a longer span, within :data:`SILENCE_WINDOW_SHARE` of its
    length, up to :data:`SILENCE_WINDOW_MAX_SECONDS`), the first ends where the silence starts and the
    second starts where it ends (the nearest span; only if both words keep a positive length); a first
    word starting in or just before a silence starts at its end, a last word ending in or just after one
    ends at its start. DTW gives every frame to some word, so without this a pause is split between
    the words either side.

    >>> snap_to_silence([("a", 0.0, 0.5), ("b", 0.5, 1.0)], [(0.42, 0.52)])
    [('a', 0.0, 0.42), ('b', 0.52, 1.0)]
    >>> snap_to_silence([("a", 0.0, 0.9), ("b", 0.9, 2.5)], [(1.2, 2.2)])  # "b" would hold a 1-s pause
    [('a', 0.0, 1.2), ('b', 2.2, 2.5)]
    """

    def reach(s: tuple[float, float]) -> float:
        return max(window, min(SILENCE_WINDOW_SHARE * (s[1] - s[0]), SILENCE_WINDOW_MAX_SECONDS))

    def nearest(t: float) -> tuple[float, float] | None:
        near = [s for s in spans if s[0] - reach(s) <= t <= s[1] + reach(s)]
        return min(near, key=lambda s: 0.0 if s[0] <= t <= s[1] else min(abs(t - s[0]), abs(t - s[1])), default=None)

    text = [w for w, _, _ in words]
    start = [float(a) for _, a, _ in words]
    end = [float(b) for _, _, b in words]
    for k in range(len(words) - 1):
        s = nearest(end[k])
        if s and s[0] > start[k] and s[1] < end[k + 1]:
            end[k], start[k + 1] = s[0], s[1]
    if words:
        s = nearest(start[0])
        if s and s[1] < end[0]:
            start[0] = s[1]
        s = nearest(end[-1])
        if s and start[-1] < s[0]:
            end[-1] = s[0]
    return list(zip(text, start, end))


def quiet_cuts(
    wav: Tensor,
    sampling_rate: int,
    max_seconds: float = 30.0,
    search_seconds: float = 5.0,
    frame_seconds: float = 0.05,
) -> list[tuple[int, int]]:
    """Cut a waveform longer than ``max_seconds`` into consecutive pieces of at most ``max_seconds``, each cut at
    the quietest ``frame_seconds`` frame (lowest RMS; the latest of equally quiet ones) of the last
    ``search_seconds`` (at most half the limit) before the limit, so that a cut falls in a pause rather than inside a
    word where the speech allows. Returns ``(start, end)`` sample
    indices covering the whole waveform; one piece when it is short enough.

    >>> w = torch.ones(16000 * 70); w[16000 * 27 : 16000 * 27 + 800] = 0  # a pause at 27 s
    >>> quiet_cuts(w, 16000)
    [(0, 432400), (432400, 912000), (912000, 1120000)]
    >>> quiet_cuts(torch.zeros(16000 * 70), 16000)  # silence: pieces of the whole window
    [(0, 479600), (479600, 959200), (959200, 1120000)]
    """
    n = int(wav.shape[-1])
    limit = int(max_seconds * sampling_rate)
    if limit <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}.")
    frame = max(int(frame_seconds * sampling_rate), 1)
    search = max(min(int(search_seconds * sampling_rate), limit // 2), frame)  # every piece at least half the limit
    out: list[tuple[int, int]] = []
    start = 0
    while n - start > limit:
        lo = start + limit - search
        seg = wav[lo : start + limit].float()
        k = seg.numel() // frame
        rms = seg[: k * frame].reshape(k, frame).pow(2).mean(1)
        quietest = k - 1 - int(torch.argmin(rms.flip(0)))  # the last of equally quiet frames: in a long silence,
        cut = lo + quietest * frame + frame // 2  # pieces as long as the window, not one frame; the middle of it
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out
