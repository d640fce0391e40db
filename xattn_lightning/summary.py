"""A reading's numbers over its probes: :class:`Summary`, made by :func:`summarize` from the probes' typed
:class:`~xattn_lightning.scores.ProbeScores`, or accumulated probe by probe, process by process, with
:class:`ReadingMetric` (declared states reduced as a torchmetrics ``Metric``'s); and how two readings of the same
probes differ (:func:`paired_differences`). Pure: no logging, no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError
from xattn_lightning.functional import (
    AUTO_RELIABILITY_TARGET,
    RELIABILITY_FLOOR,
    bootstrap_mean_ci,
    masks_for_reliability,
)
from xattn_lightning.functional.alignment import timing_summary
from xattn_lightning.scores import Failure, ProbeScores, nan_mean


@dataclass
class Summary:
    """One reading over a probe set, shared by the monitor and ``compare``.

    Attributes:
        scalars: metric name (``"encoder_spes/pearson"``, ``"timestamps/mae_ms"`` ...) → value: what is logged.
        head_ranking: method → every ``(layer, head, ρ)``, best first.
        grids: method → the probe-averaged layer × head ρ grid.
        below_floor: method → (reliability, masks predicted to reach ``AUTO_RELIABILITY_TARGET``, well above the
            floor) where the corrected headline was left out.
        probes: every probe's :class:`~xattn_lightning.scores.ProbeScores`, in probe order.
        failures: the probes that could not be explained.
    """

    scalars: dict[str, float]
    head_ranking: dict[str, list[tuple[int, int, float]]]
    grids: dict[str, list[list[float]]]
    below_floor: dict[str, tuple[float, int]] = field(default_factory=dict)
    probes: list[ProbeScores] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def mean_grid(probes: Sequence[ProbeScores], method: str) -> Tensor:
    """The probe-averaged layer × head ρ grid of ``method`` (undefined cells left out of the mean)."""
    return torch.nanmean(torch.tensor([p.methods[method].grid for p in probes], dtype=torch.float64), 0)


def _mean(probes: Sequence[ProbeScores], method: str, get: Callable[[Any], float | None]) -> float | None:
    """The mean over probes of a number every probe has (``None`` when one lacks it)."""
    values = [get(p.methods[method]) for p in probes]
    return None if any(v is None for v in values) else nan_mean([float(v) for v in values if v is not None])


def summarize(
    probes: Sequence[ProbeScores],
    methods: Sequence[str],
    metrics: Sequence[str] = ("pearson", "spearman"),
    reliability_floor: float = RELIABILITY_FLOOR,
    failures: Sequence[Failure] = (),
) -> Summary:
    """Corpus scalars (means over probes; undefined ρ left out) and the head ranking per method.

    ``pearson_corrected`` (the headline) is reported only where the maps' mean split-half reliability
    reaches ``reliability_floor``; 95 % bootstrap intervals come with the raw and corrected ρ.

    Returns a :class:`Summary` (scalars, head ranking, grids, the methods below the floor, the probes).
    """
    if not probes:
        raise XAttnError("No probe utterance could be explained; nothing to summarize.")
    scalars: dict[str, float] = {}
    ranking: dict[str, list[tuple[int, int, float]]] = {}
    grids: dict[str, list[list[float]]] = {}
    below_floor: dict[str, tuple[float, int]] = {}
    for m in methods:
        for metric in metrics:
            scalars[f"{m}/{metric}"] = nan_mean([p.methods[m].agreement[metric] for p in probes])
        layers = torch.tensor([p.methods[m].layers for p in probes], dtype=torch.float64)
        for li, v in enumerate(torch.nanmean(layers, 0).tolist()):
            scalars[f"{m}/pearson_layer{li}"] = v
        grid = mean_grid(probes, m)
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
        scalars[f"{m}/coverage"] = nan_mean([p.methods[m].coverage for p in probes])
        for name, get in (
            ("n_masks", lambda s: s.n_masks),
            ("reliability", lambda s: s.reliability),
            ("pearson_corrected", lambda s: s.pearson_corrected),
        ):
            value = _mean(probes, m, get)
            if value is not None:
                scalars[f"{m}/{name}"] = value
        if "pearson" in metrics:
            _intervals(scalars, below_floor, m, probes, reliability_floor)
    gaps = [p.context_mixing_gap for p in probes]
    if all(g is not None for g in gaps):
        scalars["context_mixing_gap"] = nan_mean([float(g) for g in gaps if g is not None])
    timed = [p.timing_errors for p in probes if p.timing_errors is not None]
    if timed:
        t = timing_summary([x for errs in timed for x in errs])
        scalars.update({f"timestamps/{k}": float(v) for k, v in t.items() if k != "boundaries"})
        scalars["timestamps/boundaries"] = float(t["boundaries"])
    return Summary(scalars, ranking, grids, below_floor, list(probes), list(failures))


def _intervals(
    scalars: dict[str, float], below_floor: dict, m: str, probes: Sequence[ProbeScores], floor: float
) -> None:
    """95 % bootstrap intervals (probes and mask noise) of the raw and the corrected ρ; the corrected
    ρ and its interval are left out where the map's reliability is under the floor."""
    scores = [p.methods[m] for p in probes]
    raw = torch.tensor([s.pearson for s in scores], dtype=torch.float64)
    has_noise = all(s.mask_noise is not None for s in scores)
    noise = torch.tensor([s.mask_noise for s in scores], dtype=torch.float64) if has_noise else None
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
    rels = torch.tensor([s.reliability for s in scores], dtype=torch.float64)
    corrected = torch.tensor([s.pearson_corrected for s in scores], dtype=torch.float64)
    lo, hi = bootstrap_mean_ci(corrected, None if noise is None else noise / rels.clamp(min=1e-6).sqrt())
    scalars[f"{m}/pearson_corrected_ci_low"], scalars[f"{m}/pearson_corrected_ci_high"] = lo, hi


Reduction = Literal["cat", "sum"]


class ReadingMetric:
    """A reading's probes accumulated as a torchmetrics ``Metric`` accumulates a batch's: declared states
    (:meth:`add_state`: ``"cat"`` lists are concatenated, ``"sum"`` numbers added), :meth:`update` with this
    process's probes, :meth:`sync` with every process's states in one gather, :meth:`compute` into a
    :class:`Summary`. Hosts may declare more states (the explanations to draw, say) to travel in the same gather.

    Args:
        methods, metrics, reliability_floor: as :func:`summarize`.

    Example:
        >>> from xattn_lightning.scores import MethodScores
        >>> m = ReadingMetric(("spes",), ("pearson",))
        >>> m.update([ProbeScores("a", "", "", 1, 4, {"spes": MethodScores({"pearson": 0.5}, [0.5], [[0.5]], 1.0)})])
        >>> m.sync(lambda state: [state, {"probes": [], "failures": [Failure("b", "boom", 1)], "failed": 1}])
        >>> summary = m.compute()
        >>> summary.scalars["spes/pearson"], [f.id for f in summary.failures]
        (0.5, ['b'])
    """

    probes: list[ProbeScores]
    failures: list[Failure]
    failed: int

    def __init__(
        self, methods: Sequence[str], metrics: Sequence[str] = ("pearson", "spearman"),
        reliability_floor: float = RELIABILITY_FLOOR,
    ) -> None:  # fmt: skip
        self.methods, self.metrics, self.reliability_floor = tuple(methods), tuple(metrics), reliability_floor
        self._defaults: dict[str, tuple[Any, Reduction]] = {}
        self.add_state("probes", [], "cat")
        self.add_state("failures", [], "cat")
        self.add_state("failed", 0, "sum")

    def add_state(self, name: str, default: Any, reduce: Reduction) -> None:
        """Declare a state: its value at :meth:`reset` and how processes' values combine."""
        if reduce not in ("cat", "sum"):
            raise XAttnError(f"Expected a state's reduction 'cat' or 'sum' but got {reduce!r}.")
        self._defaults[name] = (default, reduce)
        setattr(self, name, list(default) if reduce == "cat" else default)

    def reset(self) -> None:
        """Every state back to its default."""
        for name, (default, reduce) in self._defaults.items():
            setattr(self, name, list(default) if reduce == "cat" else default)

    def update(self, probes: Sequence[ProbeScores], failures: Sequence[Failure] = ()) -> None:
        """Add explained probes and failed ones."""
        self.probes.extend(probes)
        self.failures.extend(failures)
        self.failed += len(failures)

    def state(self) -> dict[str, Any]:
        """The declared states, by name."""
        return {name: getattr(self, name) for name in self._defaults}

    def merge(self, state: dict[str, Any]) -> None:
        """Combine another process's :meth:`state` into this one, each state by its reduction."""
        for name, (_, reduce) in self._defaults.items():
            if reduce == "cat":
                getattr(self, name).extend(state.get(name, []))
            else:
                setattr(self, name, getattr(self, name) + state.get(name, 0))

    def sync(self, all_gather: Callable[[Any], list[Any]]) -> None:
        """Every process's states, gathered once (``all_gather``: the host's, every process's object in rank
        order) and reduced in rank order; each list is then put in probe order (by ``position``)."""
        gathered = all_gather(self.state())
        self.reset()
        for state in gathered:
            self.merge(state)
        for name, (_, reduce) in self._defaults.items():
            if reduce == "cat":
                getattr(self, name).sort(key=_position)

    def compute(self) -> Summary:
        """The :class:`Summary` of the probes accumulated (an error when none was explained)."""
        probes = sorted(self.probes, key=_position)
        return summarize(probes, self.methods, self.metrics, self.reliability_floor, self.failures)


def _position(item: Any) -> int:
    """Where an accumulated item sits in the probe set (its ``position``, or a tuple's first element)."""
    if isinstance(item, tuple):
        return int(item[0])
    return int(getattr(item, "position", 0))


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


def _column(probes: Sequence[ProbeScores], method: str, get: Callable[[Any], float | None]) -> Tensor:
    values = [get(p.methods[method]) if method in p.methods else None for p in probes]
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


def paired_differences(
    a: Sequence[ProbeScores],
    b: Sequence[ProbeScores],
    method: str,
    reliability_floor: float = RELIABILITY_FLOOR,
    max_reliability_gap: float = MAX_RELIABILITY_GAP,
) -> dict[str, Difference]:
    """How ``method``'s agreement changed from reading ``a`` to reading ``b`` of the same probes
    (paired by ``id``): ``pearson_corrected`` (comparable where both readings' maps reach the
    floor) and the raw ``pearson`` (comparable only where the maps are about as reliable).

    >>> from xattn_lightning.scores import MethodScores
    >>> def probe(i, rho, rel=0.8):
    ...     s = MethodScores({"pearson": rho}, [rho], [[rho]], 1.0, 256, rel, rho / rel**0.5, 0.01)
    ...     return ProbeScores(i, "", "", 1, 4, {"spes": s})
    >>> d = paired_differences([probe(i, 0.3) for i in "xyz"], [probe(i, 0.4) for i in "xyz"], "spes")
    >>> round(d["pearson"].value, 3), d["pearson"].ci_low < 0.1 < d["pearson"].ci_high
    (0.1, True)
    >>> paired_differences([probe(i, 0.3) for i in "xyz"], [probe(i, 0.4, 0.4) for i in "xyz"], "spes")["pearson"].reason
    'the maps are not equally reliable (0.80 vs 0.40): compare pearson_corrected'
    """
    by_id = {p.id: p for p in b}
    pairs = [(p, by_id[p.id]) for p in a if p.id in by_id]
    ra, rb = [x for x, _ in pairs], [y for _, y in pairs]

    def reliability(s: Any) -> float:
        return 1.0 if s.reliability is None else s.reliability

    rel_a, rel_b = nan_mean(_column(ra, method, reliability).tolist()), nan_mean(_column(rb, method, reliability).tolist())
    getters: dict[str, Callable[[Any], float | None]] = {
        "pearson": lambda s: s.agreement.get("pearson"),
        "pearson_corrected": lambda s: s.pearson_corrected,
    }
    out: dict[str, Difference] = {}
    for key, get in getters.items():
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
        elif any(method not in p.methods or get(p.methods[method]) is None for p in ra + rb):
            reason = f"{full} is missing from a reading"
        if reason:
            out[key] = Difference(full, math.nan, math.nan, math.nan, len(pairs), False, reason)
            continue
        diff = _column(rb, method, get) - _column(ra, method, get)
        noise = None
        if all(p.methods[method].mask_noise is not None for p in ra + rb):
            na, nb = _column(ra, method, lambda s: s.mask_noise), _column(rb, method, lambda s: s.mask_noise)
            if key == "pearson_corrected":  # the correction scales the noise as it scales ρ
                na = na / _column(ra, method, reliability).clamp(min=1e-6).sqrt()
                nb = nb / _column(rb, method, reliability).clamp(min=1e-6).sqrt()
            noise = (na**2 + nb**2).sqrt()
        lo, hi = bootstrap_mean_ci(diff, noise)
        out[key] = Difference(full, nan_mean(diff.tolist()), lo, hi, int((~diff.isnan()).sum()))
    return out
