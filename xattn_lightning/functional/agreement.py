"""Agreement between cross-attention and saliency (paper §1.6, §3.1), and deletion AUC (§3.3).

Correlations reuse torchmetrics' functional forms. A correlation of a constant vector is
undefined and is returned as ``nan`` (never a fake ±1); callers decide how to report it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor
from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.functional.aggregate import framewise_zscore, tokenwise_zscore

#: correlation metrics (names checked at run time; ``Metric`` for type checkers)
Metric = Literal["pearson", "spearman", "kendall"]
METRICS: tuple[str, ...] = get_args(Metric)


def correlation(x: Tensor, y: Tensor, metric: Metric = "pearson") -> float:
    """Correlation of two equally shaped tensors, flattened. ``nan`` if either is constant or non-finite.

    >>> round(correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0]), "spearman"), 4)
    1.0
    """
    check_choice("metric", metric, METRICS)
    if x.shape != y.shape:
        raise XAttnError(f"Expected maps of the same shape but got {tuple(x.shape)} and {tuple(y.shape)}.")
    a = x.reshape(-1).double()
    b = y.reshape(-1).double()
    if a.numel() < 2:
        return float("nan")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    if a.max() == a.min() or b.max() == b.min():
        return float("nan")
    if metric == "pearson":
        # centre and scale first: torchmetrics' streaming Pearson loses precision on tiny values
        a = (a - a.mean()) / a.std()
        b = (b - b.mean()) / b.std()
        r = pearson_corrcoef(a, b)
    elif metric == "spearman":
        r = spearman_corrcoef(a, b)
    else:
        tau = kendall_rank_corrcoef(a, b, variant="b")
        r = tau[0] if isinstance(tau, tuple) else tau  # a (tau, p-value) pair only with t_test=True
    return float(r.clamp(-1.0, 1.0))


def _check_pair(ca: Tensor, sm: Tensor) -> None:
    if ca.dim() != 2 or sm.dim() != 2:
        raise XAttnError(
            f"Expected [tokens, frames] attention and saliency but got {tuple(ca.shape)} and {tuple(sm.shape)}; "
            "pool input saliency with pool_saliency() and aggregate attention with aggregate_attention() first."
        )
    if ca.shape != sm.shape:
        raise XAttnError(f"Attention {tuple(ca.shape)} and saliency {tuple(sm.shape)} must have the same shape.")


def agreement(ca: Tensor, sm: Tensor, metric: Metric = "pearson", normalize: bool = True) -> float:
    """Paper-faithful agreement of one utterance: frame-wise z-scored attention vs per-token
    z-scored saliency, one correlation over the flattened ``[I, T']`` maps.

    >>> ca = torch.eye(3)
    >>> round(agreement(ca, ca * 5), 6)
    1.0
    """
    _check_pair(ca, sm)
    if normalize:
        ca, sm = framewise_zscore(ca), tokenwise_zscore(sm)
    return correlation(ca, sm, metric)


def per_token_correlation(ca: Tensor, sm: Tensor, metric: Metric = "pearson", normalize: bool = True) -> Tensor:
    """One correlation per token row (``[I]``), after the same normalisation as :func:`agreement`.

    >>> per_token_correlation(torch.eye(2) + 0.1, torch.eye(2)).tolist()
    [1.0, 1.0]
    """
    _check_pair(ca, sm)
    if normalize:
        ca, sm = framewise_zscore(ca), tokenwise_zscore(sm)
    return torch.tensor([correlation(a, s, metric) for a, s in zip(ca, sm)], dtype=torch.float64)


def agreement_grid(ca: Tensor, sm: Tensor, metric: Metric = "pearson", normalize: bool = True) -> Tensor:
    """Agreement of every single (layer, head) map with the saliency: ``[L, H]``.

    >>> agreement_grid(torch.rand(2, 3, 4, 5), torch.rand(4, 5)).shape
    torch.Size([2, 3])
    """
    if ca.dim() != 4:
        raise XAttnError(f"Expected cross-attention [layers, heads, tokens, frames] but got {tuple(ca.shape)}.")
    if metric == "pearson":
        _check_pair(ca[0, 0], sm)
        a, b = (framewise_zscore(ca), tokenwise_zscore(sm)) if normalize else (ca, sm)
        return _pearson_rows(a.reshape(ca.shape[0] * ca.shape[1], -1), b.reshape(-1)).view(ca.shape[:2])
    grid = torch.empty(ca.shape[:2], dtype=torch.float64)
    for li in range(ca.shape[0]):
        for hi in range(ca.shape[1]):
            grid[li, hi] = agreement(ca[li, hi], sm, metric, normalize)
    return grid


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row of ``x [K, N]`` with ``y [N]`` in one batched product;
    ``nan`` for a constant or non-finite row (as :func:`correlation`)."""
    x, y = x.double(), y.double()
    if y.numel() < 2 or not bool(torch.isfinite(y).all()) or y.max() == y.min():
        return torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    yc = y - y.mean()
    r = (xc @ yc) / (xc.norm(dim=-1) * yc.norm())
    bad = ~torch.isfinite(x).all(-1) | (x.amax(-1) == x.amin(-1))
    return r.clamp(-1.0, 1.0).masked_fill(bad, float("nan"))


def deletion_auc(fractions: Sequence[float], scores: Sequence[float], max_score: float = 100.0) -> float:
    """Normalised area under a deletion/insertion curve: trapezoid over the fractions in [0, 1]
    of the scores clipped at ``max_score`` (WER clipped at 100, as SPES' ``wer_max``).

    >>> deletion_auc([0.0, 0.5, 1.0], [0.0, 100.0, 100.0])
    75.0
    """
    f = torch.as_tensor(list(fractions), dtype=torch.float64)
    s = torch.as_tensor(list(scores), dtype=torch.float64).clamp(max=max_score)
    if f.numel() != s.numel() or f.numel() < 2:
        raise XAttnError("Expected at least two (fraction, score) points of equal count.")
    if not torch.all(f[1:] > f[:-1]):
        raise XAttnError("Deletion fractions must be strictly increasing.")
    span = float(f[-1] - f[0])
    return float(torch.trapezoid(s, f) / span)


def topk_overlap(ca: Tensor, sm: Tensor, fraction: float = 0.1) -> float:
    """Saliency coverage: per token, the share of its top-``fraction`` salient frames that are also
    among its top-``fraction`` attended frames (k = max(1, ceil(fraction·T'))), averaged over tokens.

    >>> topk_overlap(torch.eye(4), torch.eye(4), 0.25)
    1.0
    """
    _check_pair(ca, sm)
    k = max(1, int(-(-fraction * ca.shape[1] // 1)))
    top_ca = ca.topk(k, dim=1).indices
    top_sm = sm.topk(k, dim=1).indices
    hits = (top_ca.unsqueeze(2) == top_sm.unsqueeze(1)).any(1).float().mean(1)
    return float(hits.mean())


def split_half_reliability(half_a: Tensor, half_b: Tensor, metric: Metric = "pearson") -> float:
    """Reliability of a saliency map estimated from two independent half maps ``[I, T']`` (each from
    half of the masks): their correlation in the representation the agreement uses (per-token
    z-scored, flattened), stepped up to the full number of masks with the Spearman-Brown formula
    ``2r / (1 + r)``. ``nan`` when the halves do not correlate positively (the map is noise).

    >>> x = torch.rand(3, 20)
    >>> round(split_half_reliability(x, x), 6)
    1.0
    """
    r = correlation(tokenwise_zscore(half_a), tokenwise_zscore(half_b), metric)
    if not r > 0:
        return float("nan")
    return 2.0 * r / (1.0 + r)


def disattenuate(rho: float, reliability: float) -> float:
    """Correct a correlation with a noisy map for the map's noise (Spearman's correction for
    attenuation, the attention map being exact): ``rho / sqrt(reliability)``, clipped to [-1, 1].

    >>> disattenuate(0.3, 0.36)
    0.5
    """
    if reliability != reliability or reliability <= 0 or rho != rho:
        return float("nan")
    return float(max(-1.0, min(1.0, rho / reliability**0.5)))


def map_similarity(a: Tensor, b: Tensor, metric: Metric = "pearson") -> float:
    """How alike two saliency maps of the same tokens are: the correlation of each token's row
    (``[I, ...]``, trailing axes flattened; invariant to per-token scale), averaged over the tokens
    whose correlation is defined (``nan`` if none is).

    >>> map_similarity(torch.eye(3), 2 * torch.eye(3))
    1.0
    """
    rows = per_token_correlation(a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float(), metric, False)
    rows = rows[~rows.isnan()]
    return float(rows.mean()) if rows.numel() else float("nan")


#: below this split-half reliability the attenuation correction is not trusted (not reported); chosen
#: in docs/reliability_floor.md (Whisper tiny.en, 10 utterances, 3 seeds): the lowest reliability bin
#: whose corrected ρ(CA, SM_H) lands within 0.05 of the N = 2,000 value on average
RELIABILITY_FLOOR = 0.3


def masks_for_reliability(n_masks: int, reliability: float, target: float = RELIABILITY_FLOOR) -> int:
    """Masks that would bring a map of ``reliability`` at ``n_masks`` to ``target`` (Spearman-Brown:
    ``k`` times the masks give ``k r / (1 + (k - 1) r)``).

    >>> masks_for_reliability(100, 0.25, 0.5)
    300
    """
    if not reliability > 0:
        return -1
    if reliability >= target:
        return n_masks
    k = target * (1 - reliability) / (reliability * (1 - target))
    return int(math.ceil(n_masks * k - 1e-9))


#: the mask counts ``n_masks="auto"`` chooses from: steps of the 256 masks it measures at, up to 2,048 (a
#: rung costs at most 255 masks more than the target needs; the monitor and ``compare`` continue the 256
#: they measured with, so every step is a whole block of the same mask stream). Until issue 34 each rung was
#: twice the last (256, 512, 1,024, 2,048), which cost up to twice the masks needed.
MASK_LADDER: tuple[int, ...] = tuple(range(256, 2049, 256))
#: the split-half reliability ``n_masks="auto"`` aims at: well above :data:`RELIABILITY_FLOOR`, so that
#: every checkpoint and reading gets a corrected headline (validated in ``docs/comparison.md``)
AUTO_RELIABILITY_TARGET = 0.5


def choose_n_masks(
    n_masks: int,
    reliability: float,
    target: float = AUTO_RELIABILITY_TARGET,
    ladder: Sequence[int] = MASK_LADDER,
) -> int:
    """The smallest rung of ``ladder`` at which maps measured at ``reliability`` with ``n_masks`` masks
    are predicted (:func:`masks_for_reliability`) to reach ``target``; the top rung when none is, or
    when the reliability is undefined (the maps were noise).

    >>> choose_n_masks(256, 0.34), choose_n_masks(256, 0.3), choose_n_masks(256, 0.6), choose_n_masks(256, 0.05)
    (512, 768, 256, 2048)
    """
    if not ladder:
        raise XAttnError("Expected a non-empty ladder of mask counts.")
    needed = masks_for_reliability(n_masks, reliability, target)
    if needed < 0:
        return max(ladder)
    return min((n for n in ladder if n >= needed), default=max(ladder))


def bootstrap_mean_ci(
    values: Tensor, noise_sd: Tensor | None = None, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-probe ``values`` ``[P]``: probes resampled with
    replacement and, when ``noise_sd`` ``[P]`` is given, each drawn value moved by a normal draw of its
    own mask noise (so one probe still gets an interval). Deterministic for a ``seed``; NaN values are
    left out, and the interval is ``(nan, nan)`` when none is left.

    >>> lo, hi = bootstrap_mean_ci(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    >>> 0.1 < lo < 0.45 < hi < 0.8
    True
    """
    keep = ~values.isnan()
    if noise_sd is not None:
        keep &= ~noise_sd.isnan()
    v = values[keep].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    draws = v[idx]
    if noise_sd is not None:
        draws = draws + torch.randn(draws.shape, generator=g, dtype=torch.float64) * noise_sd[keep].double()[idx]
    means = draws.mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(lo), float(hi)
