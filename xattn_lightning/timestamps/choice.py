"""The model's head set for word timestamps, chosen once without labels: candidate sets stated relative to the
model (every head, the upper half of the layers, its shipped heads, the heads that follow the consensus, and the
average of the boundaries of every head and of the consistent heads), each scored by how much each word's
log-probability drops when the encoder frames of its plain-DTW span are occluded, less how much it drops when the span
is moved 100 ms later (spans on the word's start lose it most in place, and little moved later), the candidate with the
most heads within half a standard error of the best kept and cached per model, in memory and on disk
(:mod:`.store`; :func:`choose_heads`; docs/timestamps.md, "A head set per model").
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError
from xattn_lightning.explain import explain
from xattn_lightning.functional.alignment import Word
from xattn_lightning.timestamps import store
from xattn_lightning.timestamps.align import (
    Alignment,
    TimingOptions,
    align,  # noqa: F401 (the doctests call it)
    alignment_from,
    alignment_words,
    head_words,
)
from xattn_lightning.timestamps.occlusion import CHOICE_LATER_SECONDS, Scores, span_occluder

#: the head sets :func:`choose_heads` picks from, each stated relative to the model: ``"all"`` every head;
#: ``"upper_half"`` every head of the upper half of the layers (openai-whisper's fallback); ``"model"`` the model's
#: shipped ``alignment_heads`` (left out when it has none); ``"consistent"`` the half of the heads whose own DTW
#: boundaries lie nearest the all-head ones on the choosing speech (:func:`consistent_heads`)
HEAD_SETS = ("all", "upper_half", "model", "consistent")
#: candidates of :func:`choose_heads_from` that average the word boundaries of several head sets of
#: :data:`HEAD_SETS` (:func:`~xattn_lightning.timestamps.align.ensemble_words`): ``"all+consistent"`` those of every
#: head and of the consistent heads (an ensemble that leans toward the consensus without leaving every head)
ENSEMBLES: dict[str, tuple[str, ...]] = {"all+consistent": ("all", "consistent")}
#: unlabelled utterances :func:`word_timestamps`' default chooses its head set on, once per model
#: (docs/timestamps.md, "A head set per model")
CHOICE_UTTERANCES = 8
#: the standard-error rule of :func:`choose_heads_from`: a candidate with more heads is preferred while its
#: criterion is within this many standard errors (paired, over words) of the highest (0.5: chosen by
#: leave-one-model-out among 0, 0.5, 1 and 1.5 over 15 checkpoints; docs/timestamps.md)
CHOICE_TOLERANCE_SE = 0.5


@dataclass
class HeadChoice:
    """The candidate :func:`choose_heads` picked: its name (in :data:`HEAD_SETS` or :data:`ENSEMBLES`), its
    ``[layer, head]`` pairs (every head it uses), the head sets whose word boundaries it averages (``[heads]`` for
    a single set; :func:`~xattn_lightning.timestamps.align.ensemble_words`), every head set of :data:`HEAD_SETS`,
    each candidate's criterion (the mean of :func:`span_contrast`, nats per word, higher is better), the standard error of
    each candidate's difference from the highest, on how many utterances."""

    name: str
    heads: list[list[int]]
    candidates: dict[str, list[list[int]]]
    scores: dict[str, float]
    utterances: int
    standard_errors: dict[str, float] = field(default_factory=dict)
    head_sets: list[list[list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.head_sets:
            self.head_sets = [self.heads]


def _boundaries(a: Alignment, heads: Sequence[Sequence[int]], duration_prior: float) -> list[Word]:
    return alignment_words(a, heads, timing=TimingOptions(duration_prior=duration_prior))


def head_distances(a: Alignment) -> Tensor:
    """Mean distance (s) of each single head's plain-DTW word boundaries from those of every head averaged, on one
    utterance, ``[L * H]`` in ``[layer, head]`` order (no labels).

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")[0]
    >>> head_distances(a).shape
    torch.Size([4])
    """
    num_layers, num_heads = a.cross_attention.shape[:2]
    every = [[li, h] for li in range(num_layers) for h in range(num_heads)]

    def times(words: list[Word]) -> Tensor:
        return torch.tensor([t for _, s, e in words for t in (s, e)], dtype=torch.float64)

    consensus = times(_boundaries(a, every, 0.0))
    if not len(consensus):
        return torch.zeros(len(every), dtype=torch.float64)
    return torch.stack([(times(ws) - consensus).abs().mean() for ws in head_words(a, every)])


def consistent_heads(alignments: Sequence[Alignment], distances: Sequence[Tensor] | None = None) -> list[list[int]]:
    """The half of the heads (rounded up) whose plain-DTW word boundaries lie nearest, on average, to those of
    every head averaged, over ``alignments`` (no labels): the heads that follow the consensus path.
    ``distances``: their :func:`head_distances`, when already computed.

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> len(consistent_heads(a))
    2
    """
    if not alignments:
        raise XAttnError("consistent_heads needs at least one alignment.")
    num_layers, num_heads = alignments[0].cross_attention.shape[:2]
    every = [[li, h] for li in range(num_layers) for h in range(num_heads)]
    dist = torch.stack(list(distances) if distances is not None else [head_distances(a) for a in alignments]).sum(0)
    order = torch.argsort(dist, stable=True)[: (len(every) + 1) // 2]
    return sorted(every[int(i)] for i in order)


def candidate_heads(
    alignments: Sequence[Alignment],
    shipped: Sequence[Sequence[int]] | None = None,
    distances: Sequence[Tensor] | None = None,
) -> dict[str, list[list[int]]]:
    """The candidate head sets of :data:`HEAD_SETS` for the model behind ``alignments`` (its shape read from
    their cross-attention); ``shipped``: the model's own ``alignment_heads`` (``"model"`` is left out without);
    ``distances``: the alignments' :func:`head_distances`, when already computed.

    >>> from xattn_lightning.testing import TinyS2T
    >>> a = align(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...           targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> candidate_heads(a)["upper_half"]
    [[1, 0], [1, 1]]
    """
    if not alignments:
        raise XAttnError("candidate_heads needs at least one alignment.")
    num_layers, num_heads = alignments[0].cross_attention.shape[:2]
    out = {
        "all": [[li, h] for li in range(num_layers) for h in range(num_heads)],
        "upper_half": [[li, h] for li in range(num_layers // 2, num_layers) for h in range(num_heads)],
    }
    if shipped:
        out["model"] = [[int(li), int(h)] for li, h in shipped]
    out["consistent"] = consistent_heads(alignments, distances)
    return out


def candidate_sets(candidates: dict[str, list[list[int]]]) -> dict[str, list[list[list[int]]]]:
    """Every candidate :func:`choose_heads_from` picks from, as the head sets whose word boundaries it averages:
    each head set of ``candidates`` (:func:`candidate_heads`) alone, then each of :data:`ENSEMBLES` whose head sets
    are there.

    >>> candidate_sets({"all": [[0, 0], [0, 1]], "consistent": [[0, 1]]})
    {'all': [[[0, 0], [0, 1]]], 'consistent': [[[0, 1]]], 'all+consistent': [[[0, 0], [0, 1]], [[0, 1]]]}
    """
    out = {n: [h] for n, h in candidates.items()}
    for name, parts in ENSEMBLES.items():
        if all(p in candidates for p in parts):
            out[name] = [candidates[p] for p in parts]
    return out


def choose_heads_from(
    alignments: Sequence[Alignment],
    shipped: Sequence[Sequence[int]] | None = None,
    distances: Sequence[Tensor] | None = None,
    tolerance: float = CHOICE_TOLERANCE_SE,
    *,
    scores: Scores,
) -> HeadChoice:
    """The candidate (:func:`candidate_sets`: the head sets of :func:`candidate_heads` and the ensembles of
    :data:`ENSEMBLES`) whose plain-DTW word spans hold most of what the model reads at each word's start: the mean
    of ``scores`` (:func:`span_contrast` through :func:`span_occluder`: a word's log-probability drop when its span
    is occluded, less its drop with the span moved later; higher is better) over the words of ``alignments``, by
    the standard-error rule: of the candidates
    whose mean is within ``tolerance`` standard errors of the highest (the error of the paired difference over the
    same words), the one with the most heads, counted over the head sets it averages (an average over more heads
    varies less; ties go to the earlier of :data:`HEAD_SETS`, then :data:`ENSEMBLES`). ``tolerance=0``: the
    highest mean. No labels: ``alignments`` are any utterances of the model's speech.

    >>> from xattn_lightning.testing import TinyS2T
    >>> ad = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = torch.randn(1, 16, 8)
    >>> a = align(ad, {"input_features": x}, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> choose_heads_from(a, scores=span_occluder(ad, a, [x[0]])).name in (*HEAD_SETS, *ENSEMBLES)
    True
    """
    candidates = candidate_heads(alignments, shipped, distances)
    sets = candidate_sets(candidates)
    order = [*HEAD_SETS, *ENSEMBLES]
    values = {
        n: torch.tensor([x for i in range(len(alignments)) for x in scores(i, hs)], dtype=torch.float64)
        for n, hs in sets.items()
    }
    if len({len(v) for v in values.values()}) > 1:
        raise XAttnError("scores gave the candidates different numbers of words; they must be paired word by word.")
    means = {n: float(v.mean()) if len(v) else 0.0 for n, v in values.items()}
    highest = min(sets, key=lambda n: (-round(means[n], 9), order.index(n)))
    errors = {}
    for n, v in values.items():
        d = values[highest] - v
        errors[n] = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    near = [n for n in sets if means[highest] - means[n] <= tolerance * errors[n] + 1e-12]
    best = min(near, key=lambda n: (-sum(len(h) for h in sets[n]), order.index(n)))
    heads = sorted({(li, h) for hs in sets[best] for li, h in hs})
    return HeadChoice(best, [[li, h] for li, h in heads], candidates, means, len(alignments), errors, sets[best])


@dataclass
class _ModelChoice:
    pool: list[Alignment] = field(default_factory=list)
    distances: list[Tensor] = field(default_factory=list)  # head_distances of the pool, computed once each
    features: list[Tensor] = field(default_factory=list)  # the pool's valid input features, for span_contrast
    scores: Scores | None = None  # span_occluder of the pool, kept while it grows (its encodings and drops memoised)
    # the pool's encoder outputs, filled by word_timestamps' explain passes while the choice is being made
    encodings: EncoderCache = field(default_factory=lambda: EncoderCache(max_entries=2 * CHOICE_UTTERANCES))
    choice: HeadChoice | None = None
    final: bool = False
    key: str | None = None  # the disk cache's key (store.cache_key), None: not cached on disk


_CHOICES: weakref.WeakKeyDictionary[nn.Module, _ModelChoice] = weakref.WeakKeyDictionary()


def _disk_key(adapter: Adapter) -> str | None:
    """The disk cache's key of the adapter's model: its weights, its shipped heads and what the choice depends on."""
    settings = {
        "adapter": type(adapter).__qualname__,
        "shipped": adapter.alignment_heads(),
        "head_sets": HEAD_SETS,
        "ensembles": ENSEMBLES,
        "utterances": CHOICE_UTTERANCES,
        "tolerance": CHOICE_TOLERANCE_SE,
        "later": CHOICE_LATER_SECONDS,
    }
    return store.cache_key(adapter.model, settings)


def _state(adapter: Adapter) -> _ModelChoice:
    """The model's choice state in memory; until it is final, a final choice kept on disk (by another process or
    another copy of the same weights) replaces it."""
    state = _CHOICES.get(adapter.model)
    if state is None:
        state = _CHOICES[adapter.model] = _ModelChoice(key=_disk_key(adapter))
    if not state.final:
        kept = store.load("heads", state.key)
        try:
            choice = HeadChoice(**kept) if kept is not None else None
        except TypeError:
            choice = None  # fields of another version: chosen again and written over
        if choice is not None:
            state.choice, state.final = choice, True
            state.pool, state.distances, state.features, state.scores = [], [], [], None
    return state


def choosing_encoder_cache(adapter: Adapter) -> EncoderCache | None:
    """While the model's head set is still being chosen, the cache its utterances' encoder outputs go into (pass
    it to :func:`~xattn_lightning.explain`, so that the choice's occlusions do not run the encoder again);
    ``None`` once the choice is final."""
    state = _state(adapter)
    return None if state.final else state.encodings


def _finish(state: _ModelChoice, choice: HeadChoice) -> None:
    state.choice, state.final = choice, True
    state.pool, state.distances, state.features, state.scores = [], [], [], None
    state.encodings = EncoderCache(max_entries=1)  # nothing more to keep
    store.save("heads", state.key, dataclasses.asdict(choice))


def heads_cache_file(model: nn.Module | Adapter) -> str | None:
    """The file the model's head choice is (or will be) kept in on disk, ``None`` when the disk cache is off
    (``$XATTN_LIGHTNING_CACHE=off``) or the weights cannot be fingerprinted.

    >>> import os; os.environ["XATTN_LIGHTNING_CACHE"] = "off"
    >>> from xattn_lightning.testing import TinyS2T
    >>> heads_cache_file(TinyS2T.adapter(TinyS2T(vocab_size=12))) is None
    True
    >>> del os.environ["XATTN_LIGHTNING_CACHE"]
    """
    state = _state(adapter_for(model))
    root = store.cache_dir()
    return None if root is None or state.key is None else str(root / "heads" / f"{state.key}.json")


def cached_heads(model: nn.Module | Adapter) -> HeadChoice | None:
    """The head set chosen for ``model`` so far (by :func:`choose_heads` or :func:`word_timestamps`' default, in
    this process or, once final, in an earlier one: :func:`heads_cache_file`), ``None`` before any choice.

    >>> from xattn_lightning.testing import TinyS2T
    >>> m = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> cached_heads(m) is None
    True
    >>> x = torch.randn(1, 16, 8)
    >>> a = align(m, {"input_features": x}, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> choose_for(m, a, [x[0]]).utterances, cached_heads(m).utterances
    (1, 1)
    """
    return _state(adapter_for(model)).choice


def heads_report(model: nn.Module | Adapter, *, read_back: bool = False, source: str | None = None) -> str | None:
    """One line on the model's head set (``None`` before any choice): its name and heads, on how many utterances
    it was chosen (``source``: of what), and where it is kept on disk (``read_back``: it was read back from there,
    not chosen in this call).

    >>> from xattn_lightning.testing import TinyS2T
    >>> heads_report(TinyS2T.adapter(TinyS2T(vocab_size=12))) is None
    True
    """
    choice = cached_heads(model)
    if choice is None:
        return None
    where = heads_cache_file(model)
    if where is None:
        how = "not kept: the disk cache is off"
    elif read_back:
        how = f"read back from {where}"
    elif Path(where).is_file():
        how = f"kept in {where} for the next runs"
    else:
        how = f"not kept: a choice is kept once made on {CHOICE_UTTERANCES} utterances"
    of = f" of {source}" if source else ""
    return f"head set: {choice.name} ({len(choice.heads)} heads), chosen on {choice.utterances} utterances{of}; {how}"


def forget_heads(model: nn.Module | Adapter) -> None:
    """Drop ``model``'s cached head choice, in memory and on disk, so that the next call chooses again (changed
    weights are chosen for anew on their own: the disk cache is keyed by them; in memory, call this after changing
    them in place).

    >>> from xattn_lightning.testing import TinyS2T
    >>> m = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = torch.randn(1, 16, 8)
    >>> a = align(m, {"input_features": x}, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> _ = choose_for(m, a, [x[0]])
    >>> forget_heads(m); cached_heads(m) is None
    True
    """
    adapter = adapter_for(model)
    state = _CHOICES.pop(adapter.model, None)
    store.remove("heads", state.key if state is not None else _disk_key(adapter))


def choose_for(
    adapter: Adapter,
    alignments: Sequence[Alignment],
    features: Sequence[Tensor] | Callable[[], Sequence[Tensor]],
) -> HeadChoice:
    """The cached head set of the adapter's model; until :data:`CHOICE_UTTERANCES` utterances have been seen,
    chosen again on every utterance seen so far including ``alignments`` each time their number has doubled since
    the last choice (at 1, 2, 4, ... utterances; then, at :data:`CHOICE_UTTERANCES`, fixed). ``features``: each
    alignment's input features as the model takes them (:func:`span_occluder`), for :func:`span_contrast`, or a
    function that returns them, called only while the choice is still being made. What :func:`word_timestamps`'
    default calls with the alignments it has made.

    >>> from xattn_lightning.testing import TinyS2T
    >>> m = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> x = torch.randn(1, 16, 8)
    >>> a = align(m, {"input_features": x}, targets=[[1, 5, 6, 2]], tokenizer=lambda i: f" w{i}")
    >>> choose_for(m, a, [x[0]]) is cached_heads(m)
    True
    """
    state = _state(adapter)
    if state.final and state.choice is not None:
        return state.choice
    if callable(features):
        features = features()
    if len(features) != len(alignments):
        raise XAttnError(f"{len(alignments)} alignments but features of {len(features)} utterances.")
    room = max(CHOICE_UTTERANCES - len(state.pool), 0)
    state.pool += list(alignments)[:room]  # in place: the occluder reads the pool as it grows
    state.features += list(features)[:room]
    state.distances += [head_distances(a) for a in list(alignments)[:room]]
    if not state.pool:
        raise XAttnError("Choosing a head set needs at least one utterance.")
    if state.scores is None:  # one occluder while the pool grows: each utterance encoded, each span occluded once
        state.scores = span_occluder(adapter, state.pool, state.features, encoder_cache=state.encodings)
    done = len(state.pool) >= CHOICE_UTTERANCES
    if state.choice is None or done or len(state.pool) >= 2 * state.choice.utterances:  # at 1, 2, 4, ... utterances
        state.choice = choose_heads_from(state.pool, adapter.alignment_heads(), state.distances, scores=state.scores)
    if done:
        _finish(state, state.choice)
    return state.choice


def choose_heads(
    model: nn.Module | Adapter,
    batches: Iterable[Any],
    *,
    tokenizer: object | None = None,
    max_utterances: int = CHOICE_UTTERANCES,
) -> HeadChoice:
    """Choose the model's head set for word timestamps from unlabelled speech, once, and cache it (in memory and
    on disk, :func:`heads_cache_file`, where it replaces an earlier choice): the
    candidate (:data:`HEAD_SETS`, :data:`ENSEMBLES`) whose plain-DTW word spans hold each word's start, by
    :func:`span_contrast` (:func:`choose_heads_from`), on the first ``max_utterances`` utterances of ``batches``. :func:`word_timestamps`
    uses it by default; without this call it chooses on the first utterances it times.
    One pass per utterance, as a greedy decode, then the criterion's occlusions: two decoder passes per word and
    candidate, batched (about 6 s for 8 utterances of Whisper tiny.en on a 2-core CPU).

    Example (a real Whisper and its processor)::

        choice = xl.timestamps.choose_heads(model, [features_batch(processor, rows[:8])], tokenizer=processor)
        choice.name, choice.scores  # 'all+consistent', {'all': 2.24, 'upper_half': 2.06, 'model': 1.37, ...}: nats per word
    """
    adapter = adapter_for(model, tokenizer)
    aligns: list[Alignment] = []
    features: list[Tensor] = []
    encodings = EncoderCache(max_entries=max(max_utterances, 1))
    for b in batches:
        utts = adapter.utterances(adapter.model_batch(b))
        for e in explain(adapter, b, encoder_cache=encodings):
            aligns.append(alignment_from(e))
            features.append(utts[e.index].features)
        if len(aligns) >= max_utterances:
            break
    if not aligns:
        raise XAttnError("choose_heads needs at least one utterance of speech.")
    aligns, features = aligns[:max_utterances], features[:max_utterances]
    scores = span_occluder(adapter, aligns, features, encoder_cache=encodings)
    choice = choose_heads_from(aligns, adapter.alignment_heads(), scores=scores)
    _finish(_state(adapter), choice)
    return choice
