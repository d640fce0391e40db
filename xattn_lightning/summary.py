"""Turn explanations into the numbers the monitor and ``compare`` report (pure, no logging)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError
from xattn_lightning.explain import Explanation
from xattn_lightning.functional import (
    AUTO_RELIABILITY_TARGET,
    RELIABILITY_FLOOR,
    bootstrap_mean_ci,
    disattenuate,
    masks_for_reliability,
    topk_overlap,
)
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec
from xattn_lightning.functional.agreement import Metric
from xattn_lightning.functional.alignment import timing_summary


def nan_mean(values: Sequence[float]) -> float:
    """Mean leaving out NaN (``nan`` when nothing is left)."""
    return float(torch.tensor(list(values), dtype=torch.float64).nanmean())


def pearson_scores(row: Mapping[str, Any], methods: Sequence[str]) -> dict[str, float]:
    """The ρ per method already in a probe's row (figure titles show the logged numbers).

    >>> pearson_scores({"spes/pearson": 0.3}, ["spes", "encoder_spes"])
    {'spes': 0.3}
    """
    return {m: row[f"{m}/pearson"] for m in methods if f"{m}/pearson" in row}


def probe_scores(
    e: Explanation,
    methods: Sequence[str],
    metrics: Sequence[str] = ("pearson", "spearman"),
    layers: LayerSpec = None,
    heads: HeadSpec = None,
) -> dict:
    """Per-utterance numbers: ρ per method/metric of the attention aggregated over ``layers`` ×
    ``heads`` (default all: the full average), per layer, per (layer, head), coverage."""
    out: dict[str, Any] = {"num_tokens": int(e.token_ids.numel()), "num_frames": e.num_frames}
    for m in methods:
        for metric in metrics:
            out[f"{m}/{metric}"] = e.agreement(m, layers=layers, heads=heads, metric=cast(Metric, metric))
        out[f"{m}/layers"] = e.layer_agreement(m).tolist()
        out[f"{m}/grid"] = e.agreement_grid(m).tolist()
        out[f"{m}/coverage"] = topk_overlap(e.attention(layers, heads), e.pooled(m))
        if "n_masks" in e.info.get(m, {}):
            out[f"{m}/n_masks"] = float(e.info[m]["n_masks"])
        if "halves" in e.info.get(m, {}):  # perturbation maps: how noisy, and ρ corrected for that noise
            rel = e.reliability(m)
            out[f"{m}/reliability"] = rel
            if "pearson" in metrics:
                out[f"{m}/pearson_corrected"] = disattenuate(out[f"{m}/pearson"], rel)
                out[f"{m}/mask_noise"] = e.mask_noise(m, layers=layers, heads=heads)
    if "spes" in methods and "encoder_spes" in methods:
        out["context_mixing_gap"] = out["encoder_spes/pearson"] - out["spes/pearson"]
    return out


@dataclass
class Summary:
    """One reading over a probe set, shared by the monitor and ``compare``.

    Attributes:
        scalars: metric name (``"encoder_spes/pearson"``, ``"timestamps/mae_ms"`` ...) → value.
        head_ranking: method → every ``(layer, head, ρ)``, best first.
        grids: method → the probe-averaged layer × head ρ grid.
        below_floor: method → (reliability, masks predicted to reach ``AUTO_RELIABILITY_TARGET``, well above the
            floor) where the corrected
            headline was left out.
    """

    scalars: dict[str, float]
    head_ranking: dict[str, list[tuple[int, int, float]]]
    grids: dict[str, list[list[float]]]
    below_floor: dict[str, tuple[float, int]] = field(default_factory=dict)


#: row key of a probe's word-boundary errors (s), when its batch carries word timings
TIMING_ERRORS = "timestamps/errors"


def mean_grid(rows: Sequence[dict], method: str) -> Tensor:
    """The probe-averaged layer × head ρ grid of ``method`` (undefined cells left out of the mean)."""
    return torch.nanmean(torch.tensor([r[f"{method}/grid"] for r in rows], dtype=torch.float64), 0)


def summarize(
    rows: Sequence[dict],
    methods: Sequence[str],
    metrics: Sequence[str] = ("pearson", "spearman"),
    reliability_floor: float = RELIABILITY_FLOOR,
) -> Summary:
    """Corpus scalars (means over probes; undefined ρ left out) and the head ranking per method.

    ``pearson_corrected`` (the headline) is reported only where the maps' mean split-half reliability
    reaches ``reliability_floor``; 95 % bootstrap intervals come with the raw and corrected ρ.

    Returns a :class:`Summary` (scalars, head ranking, grids, and the methods below the floor).
    """
    if not rows:
        raise XAttnError("No probe utterance could be explained; nothing to summarize.")
    scalars: dict[str, float] = {}
    ranking: dict[str, list[tuple[int, int, float]]] = {}
    grids: dict[str, list[list[float]]] = {}
    below_floor: dict[str, tuple[float, int]] = {}
    for m in methods:
        for metric in metrics:
            scalars[f"{m}/{metric}"] = nan_mean([r[f"{m}/{metric}"] for r in rows])
        layers = torch.tensor([r[f"{m}/layers"] for r in rows], dtype=torch.float64)
        layer_mean = torch.nanmean(layers, 0)
        for li, v in enumerate(layer_mean.tolist()):
            scalars[f"{m}/pearson_layer{li}"] = v
        grid = mean_grid(rows, m)
        grids[m] = grid.tolist()
        order = sorted(
            ((li, hi, float(grid[li, hi])) for li in range(grid.shape[0]) for hi in range(grid.shape[1])),
            key=lambda x: -x[2] if not math.isnan(x[2]) else math.inf,
        )
        ranking[m] = order
        if order and not math.isnan(order[0][2]):
            scalars[f"{m}/pearson_best_head"] = order[0][2]
            scalars[f"{m}/best_head_layer"] = float(order[0][0])
            scalars[f"{m}/best_head_index"] = float(order[0][1])
        scalars[f"{m}/coverage"] = nan_mean([r[f"{m}/coverage"] for r in rows])
        for extra in ("n_masks", "reliability", "pearson_corrected"):
            if all(f"{m}/{extra}" in r for r in rows):
                scalars[f"{m}/{extra}"] = nan_mean([r[f"{m}/{extra}"] for r in rows])
        if "pearson" in metrics:
            _intervals(scalars, below_floor, m, rows, reliability_floor)
    if all("context_mixing_gap" in r for r in rows) and rows:
        scalars["context_mixing_gap"] = nan_mean([r["context_mixing_gap"] for r in rows])
    timed = [r[TIMING_ERRORS] for r in rows if TIMING_ERRORS in r]
    if timed:
        t = timing_summary([x for errs in timed for x in errs])
        scalars.update({f"timestamps/{k}": float(v) for k, v in t.items() if k != "boundaries"})
        scalars["timestamps/boundaries"] = float(t["boundaries"])
    return Summary(scalars, ranking, grids, below_floor)


def _intervals(scalars: dict, below_floor: dict, m: str, rows: Sequence[dict], floor: float) -> None:
    """95 % bootstrap intervals (probes and mask noise) of the raw and the corrected ρ; the corrected
    ρ and its interval are left out where the map's reliability is under the floor."""
    raw = torch.tensor([r[f"{m}/pearson"] for r in rows], dtype=torch.float64)
    noise = (
        torch.tensor([r[f"{m}/mask_noise"] for r in rows], dtype=torch.float64)
        if all(f"{m}/mask_noise" in r for r in rows)
        else None
    )
    scalars[f"{m}/pearson_ci_low"], scalars[f"{m}/pearson_ci_high"] = bootstrap_mean_ci(raw, noise)
    if f"{m}/pearson_corrected" not in scalars:
        return
    rel = scalars[f"{m}/reliability"]
    if not rel >= floor:  # the correction would mostly amplify noise
        del scalars[f"{m}/pearson_corrected"]
        n = int(scalars.get(f"{m}/n_masks", 0) or 0)
        # the count suggested aims at the reliability n_masks='auto' aims at, not at the floor itself: measured on
        # a few probes, a reliability is noisy, and a count aimed at the floor fell short of it in practice
        # (64 masks at 0.18 -> 126 suggested -> 0.21 measured)
        target = max(AUTO_RELIABILITY_TARGET, floor)
        below_floor[m] = (rel, masks_for_reliability(n, rel, target) if n else -1)
        return
    rels = torch.tensor([r[f"{m}/reliability"] for r in rows], dtype=torch.float64)
    corrected = torch.tensor([r[f"{m}/pearson_corrected"] for r in rows], dtype=torch.float64)
    lo, hi = bootstrap_mean_ci(corrected, None if noise is None else noise / rels.clamp(min=1e-6).sqrt())
    scalars[f"{m}/pearson_corrected_ci_low"], scalars[f"{m}/pearson_corrected_ci_high"] = lo, hi


#: raw ρ of two readings whose maps' mean reliabilities differ by more than this are not compared
#: (the noisier maps attenuate their ρ more); the corrected ρ is compared instead
MAX_RELIABILITY_GAP = 0.1


@dataclass(frozen=True)
class Difference:
    """``b − a`` of one number between two readings of the same probes, with a 95 % interval.

    The interval is a paired bootstrap over the probes both readings explained, each probe's
    difference moved by its own mask noise (both maps' noise, taken as independent: conservative
    when the two readings drew the same masks). Where the difference must not be read
    (``comparable`` is false), ``reason`` says why and ``value`` is NaN.
    """

    key: str
    value: float
    ci_low: float
    ci_high: float
    probes: int
    comparable: bool = True
    reason: str = ""

    def __str__(self) -> str:
        if not self.comparable:
            return f"not comparable: {self.reason}"
        return f"{self.value:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> Tensor:
    return torch.tensor([float(r.get(key, math.nan)) for r in rows], dtype=torch.float64)


def paired_differences(
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    method: str,
    reliability_floor: float = RELIABILITY_FLOOR,
    max_reliability_gap: float = MAX_RELIABILITY_GAP,
) -> dict[str, Difference]:
    """How ``method``'s agreement changed from reading ``a`` to reading ``b`` of the same probes
    (rows paired by ``id``): ``pearson_corrected`` (comparable where both readings' maps reach the
    floor) and the raw ``pearson`` (comparable only where the maps are about as reliable).

    >>> a = [{"id": i, "spes/pearson": 0.3, "spes/reliability": 0.8, "spes/pearson_corrected": 0.3 / 0.8**0.5,
    ...       "spes/mask_noise": 0.01} for i in "xyz"]
    >>> b = [dict(r, **{"spes/pearson": 0.4, "spes/pearson_corrected": 0.4 / 0.8**0.5}) for r in a]
    >>> d = paired_differences(a, b, "spes")
    >>> round(d["pearson"].value, 3), d["pearson"].ci_low < 0.1 < d["pearson"].ci_high
    (0.1, True)
    >>> paired_differences(a, [dict(r, **{"spes/reliability": 0.4}) for r in b], "spes")["pearson"].reason
    'the maps are not equally reliable (0.80 vs 0.40): compare pearson_corrected'
    """
    by_id = {r["id"]: r for r in rows_b}
    pairs = [(r, by_id[r["id"]]) for r in rows_a if r.get("id") in by_id]
    ra, rb = [a for a, _ in pairs], [b for _, b in pairs]
    rel_key = f"{method}/reliability"
    rel_a, rel_b = (
        nan_mean([float(r.get(rel_key, 1.0)) for r in ra]),
        nan_mean([float(r.get(rel_key, 1.0)) for r in rb]),
    )
    out: dict[str, Difference] = {}
    for key in ("pearson", "pearson_corrected"):
        full = f"{method}/{key}"
        reason = ""
        if not pairs:
            reason = "no probe explained in both readings"
        elif key == "pearson_corrected" and not min(rel_a, rel_b) >= reliability_floor:
            reason = (
                f"a reading's maps are below the reliability floor {reliability_floor} ({rel_a:.2f} vs {rel_b:.2f})"
            )
        elif key == "pearson" and not abs(rel_a - rel_b) <= max_reliability_gap:
            reason = f"the maps are not equally reliable ({rel_a:.2f} vs {rel_b:.2f}): compare pearson_corrected"
        elif not all(full in r for r in ra + rb):
            reason = f"{full} is missing from a reading"
        if reason:
            out[key] = Difference(full, math.nan, math.nan, math.nan, len(pairs), False, reason)
            continue
        diff = _column(rb, full) - _column(ra, full)
        noise_key = f"{method}/mask_noise"
        noise = None
        if all(noise_key in r for r in ra + rb):
            na, nb = _column(ra, noise_key), _column(rb, noise_key)
            if key == "pearson_corrected":  # the correction scales the noise as it scales ρ
                na = na / _column(ra, rel_key).clamp(min=1e-6).sqrt()
                nb = nb / _column(rb, rel_key).clamp(min=1e-6).sqrt()
            noise = (na**2 + nb**2).sqrt()
        lo, hi = bootstrap_mean_ci(diff, noise)
        out[key] = Difference(full, nan_mean(diff.tolist()), lo, hi, int((~diff.isnan()).sum()))
    return out
