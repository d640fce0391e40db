"""Span occlusion, the criterion the default's head-set choice reads (:mod:`.choice`): for each word that plain DTW
over a candidate head set places, how much the word's log-probability drops when the encoder frames of its span are
occluded through the adapter's ``masked_decoder``, less how much it drops when the same span is moved
:data:`CHOICE_LATER_SECONDS` later (docs/timestamps.md, "A head set per model").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from xattn_lightning.adapters import Adapter
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.alignment import group_words
from xattn_lightning.timestamps.align import Alignment, TimingOptions, align, ensemble_words  # noqa: F401 (align: doctests)

#: the duration prior of the DTW whose word spans :func:`span_drops` occludes: 0, plain DTW (the candidates' own
#: spans, before the default's prior pulls them toward the same spelling-proportional split)
CHOICE_DURATION_PRIOR = 0.0

#: words per utterance whose spans :func:`span_drops` occludes (the first ones): a hallucinated transcript of hundreds
#: of words would otherwise cost hundreds of decoder passes
CHOICE_MAX_WORDS = 64
#: how far later :func:`span_contrast` moves each span (seconds). The decoder reads a word most at its start: on
#: true word spans (``timed-en``, six checkpoints) the drop is about 5 nats in place, 3.6 moved 100 ms earlier and
#: 1.3 moved 100 ms later, so a span in place loses much more than the same span moved later, and an early span
#: (whose later move brings it onto the word) loses little or gains
CHOICE_LATER_SECONDS = 0.1
#: masks per decoder batch in :func:`span_drops`: a pass streams the whole vocabulary projection once whatever
#: its rows (memory-bound on a CPU), and each mask projects only its own word's tokens, so fewer, larger passes
#: are cheaper: 8 timed-en utterances' occlusions on tiny.en took 6.2 s at 24, 6.8-7.6 s at 16, 8.6-10 s at 8
_SPAN_BATCH = 24

#: ``scores(i, head_sets)``: the criterion (:func:`span_contrast`, or :func:`span_drops`) of each word of the i-th
#: choosing utterance for a candidate (its head sets); higher is better
Scores = Callable[[int, Sequence[Sequence[Sequence[int]]]], Sequence[float]]


class _Occlusion:
    """One utterance's span occlusion: the decoder's occluded passes set up once (the clean log-probabilities, the
    masked decoder), and each word's drop for each span computed once, whichever candidates share it."""

    def __init__(self, adapter: Adapter, a: Alignment, encoder_out: Tensor) -> None:
        if a.pieces is None:
            raise XAttnError("span_drops needs token strings: make the alignment with a tokenizer.")
        self.a = a
        self.groups = group_words(a.pieces)[:CHOICE_MAX_WORDS]
        self.frames = int(a.cross_attention.shape[-1])
        self.device = encoder_out.device
        self.cache: dict[tuple[int, int, int], float] = {}
        if not self.groups:
            return
        ids = a.decoder_ids.to(self.device)
        self.rows = torch.tensor([a.num_prompt + i - 1 for g in self.groups for i in g], device=self.device)
        self.owner = torch.tensor([k for k, g in enumerate(self.groups) for _ in g], device=self.device)
        self.targets = ids[self.rows + 1]  # each row predicts the next token
        self.run = adapter.masked_decoder(encoder_out, ids[: int(self.rows.max()) + 1], positions=self.rows)
        self.clean = self._word_logp(torch.ones(1, self.frames, dtype=torch.bool, device=self.device))[0]

    def _word_logp(self, keep: Tensor) -> Tensor:  # [B, all words]
        """Each word's log-probability under each mask of ``keep``."""
        logp = torch.log_softmax(self.run(keep).float(), -1)
        logp = logp[:, torch.arange(len(self.targets), device=self.device), self.targets]
        return torch.zeros(keep.shape[0], len(self.groups), device=self.device).index_add_(1, self.owner, logp)

    def _row_logp(self, keep: Tensor, words: Sequence[int]) -> Tensor:  # [B]
        """Under each mask of ``keep``, the log-probability of its own word ``words[b]``: the decoder runs up to the
        last of their tokens, and only each row's own tokens reach the vocabulary."""
        own = [torch.nonzero(self.owner == k).flatten() for k in words]  # each row's tokens (indices into rows)
        width = max(len(i) for i in own)
        index = torch.stack([torch.cat([i, i[-1:].expand(width - len(i))]) for i in own])  # [B, W], padded
        counted = torch.arange(width, device=self.device) < torch.tensor([len(i) for i in own], device=self.device)[:, None]
        logp = torch.log_softmax(self.run(keep, at=self.rows[index]).float(), -1)  # [B, W, V]
        return (logp.gather(-1, self.targets[index].unsqueeze(-1)).squeeze(-1) * counted).sum(1)

    @torch.no_grad()
    def drops(self, head_sets: Sequence[Sequence[Sequence[int]]], *shifts: float) -> list[list[float]]:
        """Each word's drop with its span moved by each of ``shifts`` seconds (``[shift][word]``); every span not
        occluded before is occluded in the same batches."""
        words = ensemble_words(self.a, head_sets, timing=TimingOptions(duration_prior=CHOICE_DURATION_PRIOR))
        spans: list[list[tuple[int, int, int]]] = []
        for shift in shifts:
            moved = int(round(shift / self.a.frame_seconds))
            spans.append([])
            for k, (_, start, end) in enumerate(words[: len(self.groups)]):
                f0 = min(int(start / self.a.frame_seconds), self.frames - 1)
                f1 = max(int(round(end / self.a.frame_seconds)), f0 + 1)
                g0 = min(max(f0 + moved, 0), self.frames - 1)  # the same length, moved, kept inside the frames
                spans[-1].append((k, g0, min(max(f1 + moved, g0 + 1), self.frames)))
        flat = self.occlude([sp for row in spans for sp in row])
        n = len(spans[0]) if spans else 0
        return [flat[i * n : (i + 1) * n] for i in range(len(spans))]

    @torch.no_grad()
    def occlude(self, spans: Sequence[tuple[int, int, int]]) -> list[float]:
        """The drop of word ``k`` with encoder frames ``[f0, f1)`` occluded, for each ``(k, f0, f1)`` of ``spans``;
        the spans not occluded before run in batches of :data:`_SPAN_BATCH`, each once."""
        # in word order, so that a batch holds the spans of one or a few neighbouring words: each pass decodes only up
        # to their last token, and each mask projects only its own word's tokens onto the vocabulary
        todo = sorted(dict.fromkeys(sp for sp in spans if sp not in self.cache), key=lambda sp: sp[0])
        for c0 in range(0, len(todo), _SPAN_BATCH):
            chunk = todo[c0 : c0 + _SPAN_BATCH]
            keep = torch.ones(len(chunk), self.frames, dtype=torch.bool, device=self.device)
            for j, (_, f0, f1) in enumerate(chunk):
                keep[j, f0:f1] = False
            lp = self._row_logp(keep, [k for k, _, _ in chunk])
            for j, (k, f0, f1) in enumerate(chunk):
                self.cache[(k, f0, f1)] = float(self.clean[k] - lp[j])
        return [self.cache[sp] for sp in spans]

    def contrast(self, head_sets: Sequence[Sequence[Sequence[int]]], later: float) -> list[float]:
        in_place, moved = self.drops(head_sets, 0.0, later)
        return [d - m for d, m in zip(in_place, moved, strict=True)]


def span_drops(
    adapter: Adapter,
    a: Alignment,
    encoder_out: Tensor,
    head_sets: Sequence[Sequence[Sequence[int]]],
    shift: float = 0.0,
) -> list[float]:
    """Per word that plain DTW over ``head_sets`` places (their boundaries averaged,
    :func:`~xattn_lightning.timestamps.align.ensemble_words` with :data:`CHOICE_DURATION_PRIOR`), how much the
    word's log-probability (teacher-forced, nats, summed over its tokens) drops when the encoder frames of its span,
    moved ``shift`` seconds (later when positive; the same length, cut at the end of the speech), are occluded (zeroed, as
    :func:`~xattn_lightning.saliency.spes_encoder`'s masks do, through ``adapter.masked_decoder``). Spans that cover
    what the model reads for each word drop it most: a late or stuck head set's spans miss part of it.
    ``encoder_out``: ``adapter.encode`` of the utterance's features, ``[1, T', D]`` (Whisper's whole 30-s window). At
    most :data:`CHOICE_MAX_WORDS` words (the first).

    >>> from xattn_lightning.testing import TinyS2T
    >>> ad = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = {"input_features": torch.randn(1, 16, 8)}
    >>> a = align(ad, x, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")[0]
    >>> len(span_drops(ad, a, ad.encode(x["input_features"]), [[[0, 0], [1, 1]]]))
    2
    """
    return _Occlusion(adapter, a, encoder_out).drops(head_sets, shift)[0]


def span_contrast(
    adapter: Adapter, a: Alignment, encoder_out: Tensor, head_sets: Sequence[Sequence[Sequence[int]]]
) -> list[float]:
    """The default's criterion for a candidate head set, per word: :func:`span_drops` of its span in place less
    :func:`span_drops` of the same span moved :data:`CHOICE_LATER_SECONDS` later (nats; higher is better). The
    decoder reads a word most at its start, so a span on the word loses it far more in place than moved later; an
    early span, which the later move brings onto the word, scores low, and so does a late or stuck one, which loses
    little in place. The in-place drop alone does not see early spans: they still cover the word's start.

    >>> from xattn_lightning.testing import TinyS2T
    >>> ad = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = {"input_features": torch.randn(1, 16, 8)}
    >>> a = align(ad, x, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")[0]
    >>> len(span_contrast(ad, a, ad.encode(x["input_features"]), [[[0, 0], [1, 1]]]))
    2
    """
    return _Occlusion(adapter, a, encoder_out).contrast(head_sets, CHOICE_LATER_SECONDS)


def span_occluder(
    adapter: Adapter,
    alignments: Sequence[Alignment],
    features: Sequence[Tensor],
    later: float | None = CHOICE_LATER_SECONDS,
    encoder_cache: EncoderCache | None = None,
) -> Scores:
    """``scores(i, head_sets)``: :func:`span_contrast` of ``alignments[i]`` (with ``later=None``: :func:`span_drops`
    in place, the criterion before the contrast), whose input features as the model takes them are ``features[i]``
    (``[T, F]``, padding included where the model needs a fixed window: the
    :class:`~xattn_lightning.adapters.Utterance`'s ``features``); each utterance encoded once, each span occluded
    once whichever candidates share it (memoised). ``encoder_cache``: the
    :class:`~xattn_lightning.encoder_cache.EncoderCache` the alignments' :func:`~xattn_lightning.explain` passes
    filled, so that the encoder does not run again.

    >>> from xattn_lightning.testing import TinyS2T
    >>> ad = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = torch.randn(1, 16, 8)
    >>> a = align(ad, {"input_features": x}, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> len(span_occluder(ad, a, [x[0]])(0, [[[0, 0]]]))
    2
    """
    if len(features) != len(alignments):
        raise XAttnError(f"{len(alignments)} alignments but features of {len(features)} utterances.")
    per: dict[int, _Occlusion] = {}
    memo: dict[tuple, list[float]] = {}

    def scores(i: int, head_sets: Sequence[Sequence[Sequence[int]]]) -> list[float]:
        key = (i, tuple(tuple(sorted((int(li), int(h)) for li, h in hs)) for hs in head_sets))
        if key not in memo:
            if i not in per:
                x = features[i].to(adapter.device, adapter.dtype).unsqueeze(0)
                with torch.no_grad():
                    enc = adapter.encode(x) if encoder_cache is None else encoder_cache.encode(adapter, x)
                    per[i] = _Occlusion(adapter, alignments[i], enc)
            memo[key] = per[i].drops(head_sets, 0.0)[0] if later is None else per[i].contrast(head_sets, later)
        return memo[key]

    return scores
