"""Word timestamps from cross-attention: the timing of an alignment (``xl.word_timestamps``, in
:mod:`~xattn_lightning.timestamps.words`, builds on it).

Tokens are aligned to encoder frames by DTW over the chosen heads (the method of
openai-whisper's ``timing.py`` and transformers' ``return_token_timestamps``), with a duration prior from
each token's spelling and boundaries moved to silences of the input; the scores against true word
timings, also for the monitor's probes. Which heads to use: :mod:`xattn_lightning.timestamps.heads`. Stands
without Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import explain
from xattn_lightning.functional.alignment import (
    DURATION_PRIOR,
    Word,
    alignment_matrix,
    boundary_errors,
    length_prior,
    saliency_matrix,
    select_heads_by_agreement,
    timing_summary,
    token_times,
    with_duration_prior,
    words_from_tokens,
)
from xattn_lightning.functional.silence import silent_spans, snap_to_silence
from xattn_lightning.scores import ProbeScores
from xattn_lightning.summary import mean_grid

#: ``"transformers"``: transformers' ``return_token_timestamps`` exactly: DTW over the rows where
#: the generated tokens are the decoder *input*, so a token gets the time of the row that predicts
#: the token after it, and the EOS repeats the last time. ``"openai"``: openai-whisper's
#: ``timing.py``: DTW over the rows that *predict* the text tokens and the end-of-text token, so
#: each token gets the time of its own prediction and the last word ends where EOS is predicted.
TimingMethod = Literal["transformers", "openai"]
TIMING_METHODS = ("transformers", "openai")
DEFAULT_TIMING_METHOD: TimingMethod = "openai"
#: the named head choices of :func:`word_timestamps`: ``"auto"`` (the default) the model's head set chosen once
#: without labels (:func:`~xattn_lightning.timestamps.choice.choose_heads`); ``"all"``, ``"upper_half"``,
#: ``"consistent"`` that candidate of :data:`~xattn_lightning.timestamps.heads.HEAD_SETS`; ``"all+consistent"`` the
#: average of the boundaries of every head and of the consistent heads (that candidate of
#: :data:`~xattn_lightning.timestamps.choice.ENSEMBLES`); ``"model"`` the shipped ``alignment_heads``;
#: ``"agreement"`` per utterance by agreement with saliency
HeadRule = Literal["auto", "all", "upper_half", "consistent", "all+consistent", "model", "agreement"]
HEAD_RULES = ("auto", "all", "upper_half", "consistent", "all+consistent", "model", "agreement")


@dataclass(frozen=True)
class TimingOptions:
    """How the tokens and words of an :class:`Alignment` are timed (:func:`alignment_token_times`,
    :func:`alignment_words`), checked where it is made. The defaults are plain DTW (what
    :func:`word_timestamps` adds by default: ``duration_prior=DURATION_PRIOR, silence=True``).

    - ``method``: ``"openai"`` or ``"transformers"`` (:data:`TIMING_METHODS`).
    - ``fusion`` > 0 adds that weight of the alignment's saliency map (``Alignment.saliency``, z-scored and
      smoothed as the attention) to the DTW matrix (``"openai"`` method only).
    - ``subframe``: boundaries inside frames (:func:`~xattn_lightning.functional.alignment.token_times`).
    - ``duration_prior`` > 0 adds that weight of each token's spelling-length prior to its row of the DTW matrix
      (:func:`~xattn_lightning.functional.alignment.with_duration_prior`; ``"openai"`` method only, needs token
      strings).
    - ``silence``: word boundaries next to a silent span of the input move to its edges
      (:func:`~xattn_lightning.functional.silence.snap_to_silence`; words only, needs ``Alignment.silences``).

    Example:
        >>> TimingOptions(duration_prior=DURATION_PRIOR, silence=True).method
        'openai'
        >>> TimingOptions(method="transformers", fusion=0.2)
        Traceback (most recent call last):
        ...
        xattn_lightning.errors.XAttnError: fusion=0.2 needs the 'openai' timing method, not 'transformers'.
    """

    method: TimingMethod = DEFAULT_TIMING_METHOD
    fusion: float = 0.0
    subframe: bool = False
    duration_prior: float = 0.0
    silence: bool = False

    def __post_init__(self) -> None:
        check_choice("timing method", self.method, TIMING_METHODS)
        for name in ("fusion", "duration_prior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise XAttnError(f"Expected {name} to be a number (a weight >= 0), got {value!r}.")
            if not value >= 0:
                raise XAttnError(f"Expected {name} >= 0 (a weight), got {value!r}.")
            if value and self.method != "openai":
                raise XAttnError(f"{name}={value!r} needs the 'openai' timing method, not {self.method!r}.")


#: plain DTW timing (the default of :func:`alignment_token_times` and :func:`alignment_words`; frozen: shared safely)
PLAIN_TIMING = TimingOptions()

#: weight of the saliency map in the DTW matrix of :func:`~xattn_lightning.timestamps.words.word_timestamps` with ``heads="agreement"``: chosen on
#: the first 12 timed-en utterances (0.1-0.3 all help). Its gain is a per-token constant, a duration prior.
FUSION_WEIGHT = 0.2


@dataclass
class Alignment:
    """Decoder sequence, its cross-attention and the facts needed to time its tokens."""

    decoder_ids: Tensor  # [S] prompt, text tokens, EOS
    cross_attention: Tensor  # [L, H, S - 1, T'] one row per decoder input decoder_ids[:-1], valid frames
    num_prompt: int  # leading special tokens (the forced prompt)
    pieces: list[str] | None  # token strings of the text tokens, spaces kept
    frame_seconds: float
    index: int = 0
    num_input_frames: int | None = None  # valid input frames (transformers crops to half of them)
    saliency: Tensor | None = None  # [I, T'] encoder-resolution saliency of the text tokens, when computed
    silences: list[tuple[float, float]] | None = None  # silent spans (s) of the input, from its features
    energy: Tensor | None = None  # [frames] mean log-mel level of each input frame (what the former head-set criterion read)
    energy_frame_seconds: float = 0.01  # the length of one of those frames


def alignment_from(
    e: Any, frame_seconds: float | None = None, frame_rate: float | None = None, saliency_method: str | None = None
) -> Alignment:
    """The :class:`Alignment` of an :class:`~xattn_lightning.Explanation` (no new pass); an encoder
    frame lasts ``frame_seconds`` (default: ``e.frames_per_step`` input frames at ``frame_rate`` per
    second, by default the explanation's own: 0.02 s for Whisper). ``saliency_method``: carry that saliency map (pooled to encoder
    frames) for fusion (default: the first computed, preferring ``encoder_spes``)."""
    if saliency_method is None and e.saliency:
        saliency_method = "encoder_spes" if "encoder_spes" in e.saliency else next(iter(e.saliency))
    rate: float = frame_rate or getattr(e, "frame_rate", None) or 100.0  # input frames per second
    if frame_seconds is None:
        frame_seconds = e.frames_per_step / rate
    if e.decoder_attention is None or e.positions is None or not len(e.positions):
        raise XAttnError("This explanation carries no decoder attention; make it with xl.explain().")
    pos = e.positions.tolist()
    if pos != list(range(pos[0], pos[0] + len(pos))):
        raise XAttnError(f"Utterance {e.index}: special tokens between the text tokens; cannot time words.")
    level = e.features.float().mean(-1)  # each input frame's mean log-mel: silences and the head-set criterion
    return Alignment(
        decoder_ids=e.decoder_ids[: pos[-1] + 2],
        cross_attention=e.decoder_attention,
        num_prompt=pos[0],
        pieces=e.tokens,
        frame_seconds=frame_seconds,
        index=e.index,
        num_input_frames=e.num_frames,
        saliency=e.pooled(saliency_method) if saliency_method else None,
        silences=silent_spans(level, 1.0 / rate),
        energy=level.flatten(),
        energy_frame_seconds=1.0 / rate,
    )


def align(
    model: nn.Module | Adapter,
    batch: Any,
    *,
    tokenizer: object | None = None,
    targets: str | Tensor | Sequence = "generate",
    frame_seconds: float | None = None,
) -> list[Alignment]:
    """One pass per utterance (the encoder once, as :func:`xattn_lightning.explain`) with every decoder
    row's cross-attention. ``frame_seconds``: the length of an encoder frame (default: from the
    model's input frames per encoder frame at 100 input frames per second; 0.02 s for Whisper).

    Example:
        >>> from xattn_lightning.testing import TinyS2T
        >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
        ...           targets=[[1, 5, 6, 2]])
        >>> a[0].cross_attention.shape, a[0].num_prompt
        (torch.Size([2, 2, 3, 4]), 1)
    """
    return [alignment_from(e, frame_seconds) for e in explain(model, batch, targets=targets, tokenizer=tokenizer)]


def alignment_token_times(
    a: Alignment,
    heads: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    *,
    timing: TimingOptions = PLAIN_TIMING,
    per_head: bool = False,
) -> Tensor:
    """Start time (s) of every token of ``a.decoder_ids`` (prompt tokens at 0), by DTW over the mean of
    ``heads``' cross-attention (every head when ``None``; ``weights``: one per head), timed as ``timing`` says
    (:class:`TimingOptions`; its ``silence`` is for words only). ``per_head=True``: each head's own times,
    ``[K, S]`` (their DTWs run together).

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           targets=[[1, 5, 6, 2]])[0]
    >>> alignment_token_times(a, timing=TimingOptions(method="transformers")).shape
    torch.Size([4])
    >>> alignment_token_times(a, per_head=True).shape  # 2 layers x 2 heads
    torch.Size([4, 4])
    """
    method, fusion, duration_prior = timing.method, timing.fusion, timing.duration_prior
    s, n = len(a.decoder_ids), a.num_prompt
    if method == "transformers":  # rows with tokens n .. s-2 as decoder input, num_frames // 2 frames
        frames = a.cross_attention.shape[-1] if a.num_input_frames is None else a.num_input_frames // 2
        rows, first = a.cross_attention[:, :, n : s - 1, :frames], n
    else:  # rows predicting tokens max(n, 1) .. s-1
        rows, first = a.cross_attention[:, :, max(n - 1, 0) : s - 1], max(n, 1)
    if per_head:
        count = len(heads) if heads is not None else rows.shape[0] * rows.shape[1]
        times = torch.zeros(count, s, dtype=torch.float64)
    else:
        times = torch.zeros(s, dtype=torch.float64)
    if rows.shape[2] == 0:
        return times
    m = alignment_matrix(rows, heads, weights, reduce=not per_head)
    if duration_prior:  # the "openai" method (TimingOptions says so)
        if a.pieces is None:
            raise XAttnError("duration_prior needs token strings (pass tokenizer=).")
        m = with_duration_prior(m, length_prior(a.pieces[first - n :], rows=m.shape[-2]), duration_prior)
    if fusion:
        if a.saliency is None:
            raise XAttnError("fusion needs a saliency map (explain with methods=('encoder_spes',)).")
        m = m.clone()
        m[..., : a.saliency.shape[0], :] += fusion * saliency_matrix(a.saliency).to(m.dtype)
    t = token_times(m, a.frame_seconds, timing.subframe)
    times[..., first : first + t.shape[-1]] = t
    if method == "transformers":
        times[..., -1] = t[..., -1]
    return times


def alignment_words(
    a: Alignment,
    heads: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    *,
    timing: TimingOptions = PLAIN_TIMING,
) -> list[Word]:
    """Words with start and end (s) of one :class:`Alignment` (needs token strings: pass a tokenizer), from
    :func:`alignment_token_times`; with ``timing.silence``, boundaries next to a silent span of the input move to
    its edges (:func:`~xattn_lightning.functional.silence.snap_to_silence`; needs ``a.silences``).

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           tokenizer=lambda i: f" w{i}", targets=[[1, 5, 6, 2]])[0]
    >>> [w for w, _, _ in alignment_words(a, timing=TimingOptions(duration_prior=0.5, silence=True))]
    ['w5', 'w6']
    """
    return words_of_times(a, alignment_token_times(a, heads, weights, timing=timing), timing.silence)


def head_words(a: Alignment, heads: Sequence[Sequence[int]] | None = None) -> list[list[Word]]:
    """Each head's own plain-DTW words (:func:`alignment_words` of ``[[layer, head]]``, every head when ``heads``
    is ``None``), their DTWs run together.

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           tokenizer=lambda i: f" w{i}", targets=[[1, 5, 6, 2]])[0]
    >>> head_words(a, [[1, 0]]) == [alignment_words(a, [[1, 0]])]
    True
    """
    return [words_of_times(a, t, False) for t in alignment_token_times(a, heads, per_head=True)]


def words_of_times(a: Alignment, times: Tensor, silence: bool = False) -> list[Word]:
    """Words with start and end (s) from the token times of :func:`alignment_token_times` ``[S]``; ``silence``:
    boundaries next to a silent span moved to its edges."""
    if a.pieces is None:
        raise XAttnError("Word timestamps need token strings: pass tokenizer= (a tokenizer or processor).")
    n = a.num_prompt
    stop = n + len(a.pieces)
    end = float(times[stop]) if stop < len(times) else float(times[-1])
    words = words_from_tokens(a.pieces, times[n:stop], end)
    if silence:
        if a.silences is None:
            raise XAttnError("silence=True needs the input's silent spans: make the alignment with align() or from xl.explain().")
        words = snap_to_silence(words, a.silences)
    return words


def ensemble_words(
    a: Alignment,
    head_sets: Sequence[Sequence[Sequence[int]]],
    *,
    timing: TimingOptions = PLAIN_TIMING,
) -> list[Word]:
    """Words whose start and end are the mean of those that DTW over each of ``head_sets`` gives
    (:func:`alignment_words` with ``timing``, before any move to silences), then, with ``timing.silence``, moved to
    the silences' edges once. One head set gives exactly :func:`alignment_words`' words. An ensemble of
    boundaries: the default's ``"all+consistent"`` candidate (docs/timestamps.md, "A head set per model").

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           tokenizer=lambda i: f" w{i}", targets=[[1, 5, 6, 2]])[0]
    >>> [w for w, _, _ in ensemble_words(a, [[[0, 0]], [[1, 0], [1, 1]]])]
    ['w5', 'w6']
    """
    if not head_sets:
        raise XAttnError("ensemble_words needs at least one head set.")
    each = replace(timing, silence=False)
    runs = [alignment_words(a, heads, timing=each) for heads in head_sets]
    words = [(w[0][0], sum(x[1] for x in w) / len(w), sum(x[2] for x in w) / len(w)) for w in zip(*runs)]
    if timing.silence:
        if a.silences is None:
            raise XAttnError("silence=True needs the input's silent spans: make the alignment with align() or from xl.explain().")
        words = snap_to_silence(words, a.silences)
    return words

def timing_scores(predicted: Sequence[Sequence[Word]], reference: Sequence[Sequence[Word]]) -> dict[str, float]:
    """Mean boundary error (ms) and shares within 50 / 100 ms over utterances, for units the
    transcript got right (see :func:`xattn_lightning.functional.alignment.boundary_errors`)."""
    errors = [x for p, r in zip(predicted, reference) for x in boundary_errors(p, r)]
    return timing_summary(errors)


def score_probes(
    probes: Sequence[ProbeScores], timed: Sequence[tuple[str, Alignment, Sequence]], methods: Sequence[str]
) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """Word-timestamp errors of the probes that carry true word timings, with the heads that agree most
    with saliency in this reading (label-free, as :func:`alignment_heads`; the heads the monitor exports),
    each probe's saliency map fused in as ``word_timestamps(heads="agreement")`` does, with the duration
    prior and silences of :func:`word_timestamps`' default. ``timed`` holds ``(probe id, attention to time, true words)``;
    each probe's scores get its boundary errors (:attr:`~xattn_lightning.scores.ProbeScores.timing_errors`).

    Returns the heads and ``(probe id, cause)`` of the probes that could not be timed.
    """
    method = "encoder_spes" if "encoder_spes" in methods else methods[0]
    heads = select_heads_by_agreement(mean_grid(probes, method))
    scores_of = {p.id: p for p in probes}
    failures: list[tuple[str, str]] = []
    for pid, alignment, words in timed:
        try:
            fusion = FUSION_WEIGHT if alignment.saliency is not None else 0.0
            timing = TimingOptions(fusion=fusion, duration_prior=DURATION_PRIOR, silence=alignment.silences is not None)
            predicted = alignment_words(alignment, heads, timing=timing)
            scores_of[pid].timing_errors = boundary_errors(predicted, list(words))
        except XAttnError as err:
            failures.append((pid, str(err)))
    return heads, failures
