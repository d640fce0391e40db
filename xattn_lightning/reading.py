"""One reading of probe utterances, without Lightning: explain each probe and score it.

The monitor (this process's share of its probes) and ``compare`` (one checkpoint on the probes)
both call :func:`read`; gathering across processes, summarising and logging are theirs.

A :class:`Probe` is built once, where its batch is taken: its id, reference text and true word
timings are read from the batch then, and travel with it.

Example:
    >>> import torch, xattn_lightning as xl
    >>> from xattn_lightning.testing import TinyS2T
    >>> adapter = TinyS2T.adapter(TinyS2T(vocab_size=12))
    >>> probe = Probe.from_batch(0, {"input_features": torch.randn(1, 16, 8), "text": ["hi"]}, "probe0")
    >>> config = ReadingConfig(methods=("encoder_spes",), targets=[[1, 5, 6, 2]], saliency=SaliencyOptions.from_flat(n_masks=8))
    >>> reading = read(adapter, [probe], config)
    >>> reading.results[0].scores.id, reading.results[0].scores.text, reading.failures
    ('probe0', 'hi', [])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from xattn_lightning.adapters import Adapter
from xattn_lightning.batches import ID_KEYS, TEXT_KEYS, WORDS_KEY
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import Explanation, explain
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec, resolve_layers
from xattn_lightning.functional.alignment import Word
from xattn_lightning.saliency import perturbation_methods, validate_methods
from xattn_lightning.saliency.options import SaliencyOptions
from xattn_lightning.scores import Failure, ProbeScores, probe_scores

#: the correlation metrics a reading can report
METRICS: tuple[str, ...] = ("pearson", "spearman", "kendall")


def _first(batch: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        v = batch.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            return v[0]
    return None


@dataclass(frozen=True)
class Probe:
    """One probe utterance.

    Attributes:
        position: its place in the probe stream (stable across epochs, resumes and world sizes).
        id: its id (the batch's ``id``/``ids``/``utt_id``, else a name from its position).
        batch: the model's batch of this one utterance (tensors with a batch dimension of 1).
        text: the reference transcript, when the batch carries one.
        words: true word timings ``(word, start_s, end_s)``, when the batch carries them (``words``).
    """

    position: int
    id: str
    batch: dict[str, Any]
    text: str | None = None
    words: tuple[Word, ...] | None = None

    @classmethod
    def from_batch(cls, position: int, batch: dict[str, Any], default_id: str) -> Probe:
        """The probe of a one-utterance ``batch``, its id, text and word timings read from it."""
        pid = _first(batch, ID_KEYS)
        text = _first(batch, TEXT_KEYS)
        words = _first(batch, (WORDS_KEY,))
        return cls(
            position=position,
            id=str(pid) if pid is not None else default_id,
            batch=batch,
            text=text if isinstance(text, str) else None,
            words=tuple((str(w), float(a), float(b)) for w, a, b in words) if words else None,
        )

    def reference_text(self, adapter: Adapter) -> str:
        """The transcript: the batch's text, else its labels decoded, else ``""``."""
        if self.text is not None:
            return self.text
        labels = self.batch.get("labels")
        if isinstance(labels, Tensor):
            return adapter.decode_text(adapter.normalize_target(labels[0])[1:]) or ""
        return ""


@dataclass(frozen=True)
class ReadingConfig:
    """What a reading computes, checked once when it is made: the saliency ``methods`` and their options
    (``saliency``: one :class:`~xattn_lightning.saliency.SaliencyOptions`, handed to
    :func:`~xattn_lightning.explain` as it is), the correlation ``metrics``, the attention aggregation behind the
    headline (``layers`` × ``heads``), and the decoding (``targets``: ``"generate"``, ``"labels"`` or ids).

    >>> ReadingConfig(saliency=SaliencyOptions.from_flat(n_masks=64)).with_masks(256).saliency.n_masks
    256
    """

    methods: tuple[str, ...] = ("encoder_spes",)
    metrics: tuple[str, ...] = ("pearson", "spearman")
    layers: LayerSpec = None
    heads: HeadSpec = None
    targets: Any = "generate"
    num_beams: int = 1
    max_new_tokens: int | None = None
    saliency: SaliencyOptions = field(default_factory=SaliencyOptions)

    def __post_init__(self) -> None:
        validate_methods(self.methods)
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.methods:
            raise XAttnError("Expected at least one saliency method; see xl.list_methods().")
        for m in self.metrics:
            check_choice("metric", m, METRICS)
        if isinstance(self.targets, str):
            check_choice("targets mode", self.targets, ("generate", "labels"))
        resolve_layers(self.layers, 2**16)  # a malformed spec fails now

    @property
    def perturbation(self) -> list[str]:
        """The perturbation (mask) methods read."""
        return perturbation_methods(self.methods)

    def with_masks(self, n_masks: int) -> ReadingConfig:
        """The same config at ``n_masks`` masks per perturbation map."""
        return dataclasses.replace(self, saliency=self.saliency.with_masks(n_masks))


@dataclass
class ProbeResult:
    """One probe explained and scored (:func:`~xattn_lightning.scores.probe_scores`)."""

    probe: Probe
    scores: ProbeScores
    explanation: Explanation


@dataclass
class Reading:
    """The probes of one reading that were explained, and the :class:`~xattn_lightning.scores.Failure` of
    those that were not."""

    results: list[ProbeResult]
    failures: list[Failure]

    @property
    def scores(self) -> list[ProbeScores]:
        """The probes' scores, in probe order."""
        return [r.scores for r in self.results]


def read(
    adapter: Adapter,
    probes: Sequence[Probe],
    config: ReadingConfig,
    encoder_cache: EncoderCache | None = None,
    catch: tuple[type[BaseException], ...] = (Exception,),
    resume: Mapping[str, Explanation] | None = None,
) -> Reading:
    """Explain and score ``probes`` one at a time, so that a bad probe costs only itself: what it
    raises (of the ``catch`` types) is recorded in :attr:`Reading.failures`; anything else is raised.
    ``resume`` (probe id -> its explanation from an earlier reading with fewer masks) continues those
    probes' maps to the config's ``n_masks`` (``resume=`` of :func:`~xattn_lightning.explain`)."""
    results: list[ProbeResult] = []
    failures: list[Failure] = []
    for p in probes:
        try:
            (e,) = explain(
                adapter,
                p.batch,
                targets=config.targets,
                methods=config.methods,
                num_beams=config.num_beams,
                max_new_tokens=config.max_new_tokens,
                encoder_cache=encoder_cache,
                resume=[resume[p.id]] if resume and p.id in resume else None,
                options=config.saliency,
            )
            scores = probe_scores(
                e, config.methods, config.metrics, config.layers, config.heads, p.id, p.reference_text(adapter),
                p.position,
            )  # fmt: skip
            results.append(ProbeResult(p, scores, e))
        except catch as err:
            failures.append(Failure(p.id, f"{type(err).__name__}: {err}", p.position))
    return Reading(results, failures)
