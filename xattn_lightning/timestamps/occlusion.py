"""Span occlusion, the criterion the default's head-set choice reads (:mod:`.choice`): for each word that plain DTW
over a candidate head set places, how much the word's log-probability drops when the encoder frames of its span are
occluded through the adapter's ``masked_decoder`` (docs/timestamps.md, "A head set per model").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from xattn_lightning.adapters import Adapter
from xattn_lightning.errors import XAttnError
from xattn_lightning.functional.alignment import group_words
from xattn_lightning.timestamps.align import Alignment, TimingOptions, align, ensemble_words  # noqa: F401 (align: doctests)

#: the duration prior of the DTW whose word spans :func:`span_drops` occludes: 0, plain DTW (the candidates' own
#: spans, before the default's prior pulls them toward the same spelling-proportional split)
CHOICE_DURATION_PRIOR = 0.0

#: words per utterance whose spans :func:`span_drops` occludes (the first ones): a hallucinated transcript of hundreds
#: of words would otherwise cost hundreds of decoder passes
CHOICE_MAX_WORDS = 64
#: masks per decoder batch in :func:`span_drops`
_SPAN_BATCH = 8

#: ``drops(i, head_sets)``: :func:`span_drops` of the i-th choosing utterance for a candidate (its head sets)
Drops = Callable[[int, Sequence[Sequence[Sequence[int]]]], Sequence[float]]


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
        rows = torch.tensor([a.num_prompt + i - 1 for g in self.groups for i in g], device=self.device)
        self.owner = torch.tensor([k for k, g in enumerate(self.groups) for _ in g], device=self.device)
        self.targets = ids[rows + 1]  # each row predicts the next token
        self.run = adapter.masked_decoder(encoder_out, ids[: int(rows.max()) + 1], positions=rows)
        self.clean = self._word_logp(torch.ones(1, self.frames, dtype=torch.bool, device=self.device))[0]

    def _word_logp(self, keep: Tensor) -> Tensor:  # [B, words]
        logp = torch.log_softmax(self.run(keep).float(), -1)
        logp = logp[:, torch.arange(len(self.targets), device=self.device), self.targets]
        return torch.zeros(keep.shape[0], len(self.groups), device=self.device).index_add_(1, self.owner, logp)

    @torch.no_grad()
    def drops(self, head_sets: Sequence[Sequence[Sequence[int]]]) -> list[float]:
        words = ensemble_words(self.a, head_sets, timing=TimingOptions(duration_prior=CHOICE_DURATION_PRIOR))
        spans = []
        for k, (_, start, end) in enumerate(words[: len(self.groups)]):
            f0 = min(int(start / self.a.frame_seconds), self.frames - 1)
            spans.append((k, f0, max(int(round(end / self.a.frame_seconds)), f0 + 1)))
        todo = list(dict.fromkeys(sp for sp in spans if sp not in self.cache))
        for c0 in range(0, len(todo), _SPAN_BATCH):
            chunk = todo[c0 : c0 + _SPAN_BATCH]
            keep = torch.ones(len(chunk), self.frames, dtype=torch.bool, device=self.device)
            for j, (_, f0, f1) in enumerate(chunk):
                keep[j, f0:f1] = False
            lp = self._word_logp(keep)
            for j, (k, f0, f1) in enumerate(chunk):
                self.cache[(k, f0, f1)] = float(self.clean[k] - lp[j, k])
        return [self.cache[sp] for sp in spans]


def span_drops(
    adapter: Adapter, a: Alignment, encoder_out: Tensor, head_sets: Sequence[Sequence[Sequence[int]]]
) -> list[float]:
    """Per word that plain DTW over ``head_sets`` places (their boundaries averaged,
    :func:`~xattn_lightning.timestamps.align.ensemble_words` with :data:`CHOICE_DURATION_PRIOR`), how much the
    word's log-probability (teacher-forced, nats, summed over its tokens) drops when the encoder frames of its span
    are occluded (zeroed, as :func:`~xattn_lightning.saliency.spes_encoder`'s masks do, through
    ``adapter.masked_decoder``). Spans that cover what the model reads for each word drop it most: a late, early or
    stuck head set's spans miss part of it. ``encoder_out``: ``adapter.encode`` of the utterance's features,
    ``[1, T', D]`` (Whisper's whole 30-s window). At most :data:`CHOICE_MAX_WORDS` words (the first).

    >>> from xattn_lightning.testing import TinyS2T
    >>> ad = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = {"input_features": torch.randn(1, 16, 8)}
    >>> a = align(ad, x, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")[0]
    >>> len(span_drops(ad, a, ad.encode(x["input_features"]), [[[0, 0], [1, 1]]]))
    2
    """
    return _Occlusion(adapter, a, encoder_out).drops(head_sets)


def span_occluder(adapter: Adapter, alignments: Sequence[Alignment], features: Sequence[Tensor]) -> Drops:
    """``drops(i, head_sets)``: :func:`span_drops` of ``alignments[i]``, whose input features as the model takes them
    are ``features[i]`` (``[T, F]``, padding included where the model needs a fixed window: the
    :class:`~xattn_lightning.adapters.Utterance`'s ``features``); each utterance encoded once, each word's span occluded
    once whichever candidates share it (memoised).

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

    def drops(i: int, head_sets: Sequence[Sequence[Sequence[int]]]) -> list[float]:
        key = (i, tuple(tuple(sorted((int(li), int(h)) for li, h in hs)) for hs in head_sets))
        if key not in memo:
            if i not in per:
                x = features[i].to(adapter.device, adapter.dtype).unsqueeze(0)
                with torch.no_grad():
                    per[i] = _Occlusion(adapter, alignments[i], adapter.encode(x))
            memo[key] = per[i].drops(head_sets)
        return memo[key]

    return drops
