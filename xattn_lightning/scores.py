"""A probe's numbers, typed: :class:`ProbeScores` (what one explained utterance scores) and its
:class:`MethodScores` per saliency method, made by :func:`probe_scores` (pure, no logging).

The flat row (``"encoder_spes/pearson"`` ...) exists only where the scores leave the package, as a W&B
table row or JSON (:meth:`ProbeScores.row`).

Example:
    >>> import torch, xattn_lightning as xl
    >>> from xattn_lightning.testing import TinyS2T
    >>> (e,) = xl.explain(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
    ...                   targets=[[1, 5, 6, 2]], methods=("encoder_spes",), n_masks=16)
    >>> s = probe_scores(e, ("encoder_spes",), probe_id="a")
    >>> s.id, s.methods["encoder_spes"].n_masks, sorted(s.methods["encoder_spes"].agreement)
    ('a', 16, ['pearson', 'spearman'])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from xattn_lightning.explain import Explanation
from xattn_lightning.functional import disattenuate, topk_overlap
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec
from xattn_lightning.functional.agreement import Metric


def nan_mean(values: Sequence[float]) -> float:
    """Mean leaving out NaN (``nan`` when nothing is left).

    >>> nan_mean([1.0, float("nan"), 3.0])
    2.0
    """
    return float(torch.tensor(list(values), dtype=torch.float64).nanmean())


@dataclass
class MethodScores:
    """One saliency method's numbers for one probe.

    Attributes:
        agreement: metric → ρ of the attention aggregated over the reading's layers × heads.
        layers: Pearson ρ of each layer's head-mean attention.
        grid: Pearson ρ of every single (layer, head).
        coverage: top-k overlap of attention and saliency.
        n_masks, reliability, pearson_corrected, mask_noise: perturbation maps only (``None`` for exact maps):
            masks that ran, split-half reliability, ρ corrected for attenuation, and ρ's mask noise.
    """

    agreement: dict[str, float]
    layers: list[float]
    grid: list[list[float]]
    coverage: float
    n_masks: int | None = None
    reliability: float | None = None
    pearson_corrected: float | None = None
    mask_noise: float | None = None

    @property
    def pearson(self) -> float:
        """The raw Pearson ρ (``nan`` when it was not asked for)."""
        return self.agreement.get("pearson", math.nan)


@dataclass
class ProbeScores:
    """What one probe utterance scored in a reading.

    Attributes:
        id: the probe's id. position: its place in the probe set (the order readings are reported in).
        text: the reference transcript (``""`` without one). hypothesis: the explained tokens' text.
        num_tokens, num_frames: explained tokens and valid input frames.
        methods: method → :class:`MethodScores`.
        timing_errors: word-boundary errors (s), for a probe with true word timings, once timed.
    """

    id: str
    text: str
    hypothesis: str
    num_tokens: int
    num_frames: int
    methods: dict[str, MethodScores]
    position: int = 0
    timing_errors: list[float] | None = None

    @property
    def context_mixing_gap(self) -> float | None:
        """ρ(CA, SM_H) − ρ(CA, SM_X) when both ``encoder_spes`` and ``spes`` were read."""
        if "spes" in self.methods and "encoder_spes" in self.methods:
            return self.methods["encoder_spes"].pearson - self.methods["spes"].pearson
        return None

    def pearson(self) -> dict[str, float]:
        """The raw ρ per method (figure titles show the logged numbers)."""
        return {m: s.pearson for m, s in self.methods.items() if "pearson" in s.agreement}

    def row(self) -> dict[str, Any]:
        """The scores as one flat row (``"encoder_spes/pearson"`` ...), for tables and JSON.

        >>> ProbeScores("a", "hi", "hi", 1, 16, {"spes": MethodScores({"pearson": 0.5}, [0.5], [[0.5]], 1.0)}).row()["spes/pearson"]
        0.5
        """
        out: dict[str, Any] = {"id": self.id, "text": self.text, "hypothesis": self.hypothesis,
                               "num_tokens": self.num_tokens, "num_frames": self.num_frames}  # fmt: skip
        for m, s in self.methods.items():
            out.update({f"{m}/{metric}": v for metric, v in s.agreement.items()})
            out.update({f"{m}/layers": s.layers, f"{m}/grid": s.grid, f"{m}/coverage": s.coverage})
            for name in ("n_masks", "reliability", "pearson_corrected", "mask_noise"):
                if getattr(s, name) is not None:
                    out[f"{m}/{name}"] = getattr(s, name)
        if self.context_mixing_gap is not None:
            out["context_mixing_gap"] = self.context_mixing_gap
        if self.timing_errors is not None:
            out["timestamps/errors"] = self.timing_errors
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (checkpoints); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeScores:
        """The scores of :meth:`to_dict`."""
        fields_ = dict(data)
        fields_["methods"] = {m: MethodScores(**s) for m, s in fields_["methods"].items()}
        return cls(**fields_)


def probe_scores(
    e: Explanation,
    methods: Sequence[str],
    metrics: Sequence[str] = ("pearson", "spearman"),
    layers: LayerSpec = None,
    heads: HeadSpec = None,
    probe_id: str = "",
    text: str = "",
    position: int = 0,
) -> ProbeScores:
    """One explained utterance's numbers: ρ per method and metric of the attention aggregated over ``layers`` ×
    ``heads`` (default all: the full average), per layer, per (layer, head), coverage, and for perturbation maps
    their reliability, corrected ρ and mask noise."""
    out: dict[str, MethodScores] = {}
    for m in methods:
        r = e.result(m)
        scores = MethodScores(
            agreement={k: e.agreement(m, layers=layers, heads=heads, metric=cast(Metric, k)) for k in metrics},
            layers=e.layer_agreement(m).tolist(),
            grid=e.agreement_grid(m).tolist(),
            coverage=topk_overlap(e.attention(layers, heads), e.pooled(m)),
            n_masks=r.n_masks,
        )
        if r.halves is not None:  # perturbation maps: how noisy, and ρ corrected for that noise
            scores.reliability = e.reliability(m)
            if "pearson" in metrics:
                scores.pearson_corrected = disattenuate(scores.agreement["pearson"], scores.reliability)
                scores.mask_noise = e.mask_noise(m, layers=layers, heads=heads)
        out[m] = scores
    hypothesis = e.text or " ".join(e.tokens or map(str, e.token_ids.tolist()))
    return ProbeScores(probe_id, text, hypothesis, int(e.token_ids.numel()), e.num_frames, out, position)


@dataclass
class Failure:
    """A probe that could not be explained: its id (``""`` when the whole share failed) and the cause."""

    id: str
    cause: str
    position: int = field(default=-1)
