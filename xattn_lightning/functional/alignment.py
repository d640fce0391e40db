"""Token and word timing from cross-attention: the maths of Whisper's word timestamps.

Pure functions (no model): choose heads' maps, normalise and smooth them as openai-whisper's
``timing.py`` and transformers' ``_extract_token_timestamps`` do (z-score over tokens, median filter
over time), align tokens to encoder frames by dynamic time warping, and score predicted word
boundaries against true ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError

#: width of the median filter over time (openai-whisper and transformers use 7)
MEDIAN_FILTER_WIDTH = 7
#: seconds per Whisper encoder frame
WHISPER_FRAME_SECONDS = 0.02

Word = tuple[str, float, float]
_PUNCT = re.compile(r"^[\W_]+$")


def median_filter(x: Tensor, width: int = MEDIAN_FILTER_WIDTH) -> Tensor:
    """Median over a sliding window of odd ``width`` along the last axis, edges reflected (as transformers).

    >>> median_filter(torch.tensor([[5.0, 0.0, 9.0, 0.0, 1.0]]), 3)
    tensor([[0., 5., 0., 1., 0.]])
    """
    if width <= 0 or width % 2 != 1:
        raise XAttnError(f"Expected an odd positive median filter width but got {width}.")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    flat = torch.nn.functional.pad(flat, (pad, pad), mode="reflect")
    return flat.unfold(-1, width, 1).sort()[0][..., pad].reshape(shape)


def dtw(cost: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment of rows (tokens) to columns (frames) that minimises the summed ``cost``.

    The same recursion, tie-breaking and float32 sums as openai-whisper's and transformers' DTW,
    computed one anti-diagonal at a time (:func:`dtw_many`). Returns the path's row and column indices.

    >>> dtw(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    (array([0, 1, 1]), array([0, 1, 2]))
    """
    c = cost.detach().cpu().double().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    return dtw_many(c[None])[0]


def dtw_many(costs: Tensor | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`dtw` of each of a stack of equal-shaped cost matrices ``[B, n, m]`` (e.g. one per head), in one
    pass over the anti-diagonals (their Python loop shared, which is most of the cost on a CPU).

    >>> [r.tolist() for r, _ in dtw_many(np.array([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]))]
    [[0, 1], [0, 1, 1]]
    """
    c = np.asarray(costs.detach().cpu().double().numpy() if isinstance(costs, Tensor) else costs, dtype=np.float64)
    if c.ndim != 3:
        raise XAttnError(f"dtw_many takes cost matrices [B, n, m] but got shape {c.shape}.")
    nb, n, m = c.shape
    # skewed storage: [:, k, i] is the cell (i, k - i), so each anti-diagonal and the two before it are slices
    acc = np.full((nb, n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((nb, n + m + 1, n + 1), 2, dtype=np.int8)
    acc[:, 0, 0] = 0
    ii, jj = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    skewed = np.zeros((nb, n + m + 1, n + 1), dtype=np.float64)
    skewed[:, ii + jj, ii] = c
    for k in range(2, n + m + 1):  # cells with i + j == k
        lo, hi = max(1, k - m), min(n, k - 1)
        c0, c1, c2 = acc[:, k - 2, lo - 1 : hi], acc[:, k - 1, lo - 1 : hi], acc[:, k - 1, lo : hi + 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        best = np.where(step == 0, c0, np.where(step == 1, c1, c2))
        acc[:, k, lo : hi + 1] = (skewed[:, k, lo : hi + 1] + best).astype(np.float32)
        trace[:, k, lo : hi + 1] = step
    out = []
    for b in range(nb):
        i, j = n, m
        rows, cols = [], []
        while i > 0 or j > 0:
            rows.append(i - 1)
            cols.append(j - 1)
            t = 2 if i == 0 else 1 if j == 0 else int(trace[b, i + j, i])
            if t == 0:
                i, j = i - 1, j - 1
            elif t == 1:
                i -= 1
            else:
                j -= 1
        out.append((np.array(rows[::-1]), np.array(cols[::-1])))
    return out


def alignment_matrix(
    cross_attention: Tensor,
    heads: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    median_width: int = MEDIAN_FILTER_WIDTH,
    reduce: bool = True,
) -> Tensor:
    """The token × frame matrix DTW runs on: each chosen head's map z-scored over tokens, median
    filtered over time, then averaged over heads (weighted by ``weights`` when given; ``reduce=False``: each
    head's matrix, ``[K, I, T']``).

    Args:
        cross_attention: ``[L, H, I, T']`` (one utterance, valid frames only).
        heads: ``[layer, head]`` pairs (default: every head).
        weights: one non-negative weight per head.
        median_width: odd width (frames) of the median filter over time.
        reduce: average the heads (else one matrix per head).

    >>> alignment_matrix(torch.rand(2, 2, 3, 10), heads=[[1, 0]]).shape
    torch.Size([3, 10])
    """
    num_layers, num_heads = cross_attention.shape[:2]
    if heads is None:
        heads = [[li, h] for li in range(num_layers) for h in range(num_heads)]
    if not heads:
        raise XAttnError("No alignment heads given; pass [layer, head] pairs or heads=None for all heads.")
    for li, h in heads:
        if not (0 <= li < num_layers and 0 <= h < num_heads):
            raise XAttnError(f"Head [{li}, {h}] is outside this model's {num_layers} layers × {num_heads} heads.")
    w = torch.stack([cross_attention[li, h] for li, h in heads]).float()  # [K, I, T], float32 as transformers
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = median_filter((w - mean) / std, median_width)
    if not reduce:
        if weights is not None:
            raise XAttnError("weights= averages the heads; with reduce=False each head's matrix is returned.")
        return w
    if weights is None:
        return w.mean(0)
    wt = torch.as_tensor(weights, dtype=w.dtype)
    if wt.numel() != len(heads) or bool((wt < 0).any()) or float(wt.sum()) <= 0:
        raise XAttnError(f"Expected {len(heads)} non-negative head weights with a positive sum but got {weights}.")
    return (w * (wt / wt.sum()).view(-1, 1, 1)).sum(0)


def saliency_matrix(saliency: Tensor, median_width: int = MEDIAN_FILTER_WIDTH) -> Tensor:
    """A saliency map ``[I, T']`` made comparable with :func:`alignment_matrix`: z-scored over
    tokens per frame, median filtered over time (to be added to it with a weight).

    >>> saliency_matrix(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1).tolist()
    [[1.0, -1.0], [-1.0, 1.0]]
    """
    s = saliency.float()
    std, mean = torch.std_mean(s, dim=-2, keepdim=True, unbiased=False)
    return median_filter((s - mean) / std.clamp_min(1e-12), median_width)


#: weight of the duration prior of :func:`with_duration_prior` in word timestamps: chosen on timed speech
#: of three voices (docs/timestamps.md, "A duration prior and silences")
DURATION_PRIOR = 0.5


def length_prior(pieces: Sequence[str], rows: int | None = None) -> Tensor:
    """How long each token should last relative to the others, from its spelling: the square root of
    each piece's length in characters (spaces and punctuation-only pieces count 0), z-scored over
    the utterance's rows. ``rows`` (default ``len(pieces) + 1``): the rows of the DTW matrix; the row
    after the text (end of text) counts as length 0.

    A z-scored attention matrix gives short tokens (function words, pieces of words) little weight, so
    DTW squeezes them; this prior, added to each row, gives each token frames in proportion to its
    spelling.

    >>> length_prior([" a", " little", "."]).round(decimals=2)
    tensor([ 0.1400,  1.5800, -0.8600, -0.8600])
    """
    rows = len(pieces) + 1 if rows is None else rows
    chars = [0.0 if _PUNCT.match(p.strip() or "x") else float(len(p.strip())) for p in pieces]
    length = torch.tensor((chars + [0.0] * rows)[:rows], dtype=torch.float64).sqrt()
    std = length.std(unbiased=False)
    if rows < 2 or float(std) == 0.0:
        return torch.zeros(rows)
    return ((length - length.mean()) / std).float()


def with_duration_prior(matrix: Tensor, prior: Tensor, weight: float = DURATION_PRIOR) -> Tensor:
    """``matrix`` ``[I, T']`` (from :func:`alignment_matrix`; or a stack ``[K, I, T']``) z-scored again over tokens per frame, so that
    its scale does not depend on how many heads were averaged, plus ``weight`` × ``prior`` ``[I]`` on
    every frame of each row (DTW then gives rows with a larger prior more frames).

    >>> with_duration_prior(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, -1.0]), 0.5).tolist()
    [[1.5, -0.5], [-1.5, 0.5]]
    """
    if matrix.shape[-2] != prior.shape[0]:
        raise ValueError(f"Expected one prior per row ({matrix.shape[-2]}) but got {prior.shape[0]}.")
    std, mean = torch.std_mean(matrix.float(), dim=-2, keepdim=True, unbiased=False)
    z = (matrix.float() - mean) / std.clamp_min(1e-6)
    return z + weight * prior.to(z.dtype).unsqueeze(-1)


def token_times(matrix: Tensor, frame_seconds: float = WHISPER_FRAME_SECONDS, subframe: bool = False) -> Tensor:
    """Start time (s) of each row of ``matrix`` ``[I, T']``: the frame at which the DTW path of
    ``-matrix`` first reaches that row. A stack ``[B, I, T']`` (e.g. one matrix per head) gives ``[B, I]``, its
    DTWs run together (:func:`dtw_many`).

    ``subframe=True`` moves each boundary inside its frame: to where the two rows' values, read at
    frame centres and interpolated linearly, cross between the frame before the DTW boundary and the
    boundary frame (a boundary stays on the frame edge when they cross half-way, and stays put when
    they do not cross there).

    >>> token_times(torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4]), 0.02)
    tensor([0.0000, 0.0600], dtype=torch.float64)
    >>> token_times(torch.tensor([[1.0] * 4 + [0.2] + [0.0] * 3, [0.0] * 4 + [0.8] + [1.0] * 3]), 0.02, True)
    tensor([0.0000, 0.0825], dtype=torch.float64)
    """
    stack = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
    out = []
    for mat, (rows, cols) in zip(stack, dtw_many(-stack)):
        jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
        frames = cols[jumps].astype(np.float64)
        if subframe:
            m = mat.double().numpy()
            for i in range(1, len(frames)):
                f = int(frames[i])
                if f < 1:
                    continue
                d0, d1 = m[i, f - 1] - m[i - 1, f - 1], m[i, f] - m[i - 1, f]  # this row minus the one before
                if d0 < 0 <= d1 and d1 > d0:
                    frames[i] = max(frames[i - 1], f - 0.5 + (-d0) / (d1 - d0))
        out.append(torch.as_tensor(frames * frame_seconds, dtype=torch.float64))
    return torch.stack(out) if matrix.dim() == 3 else out[0]


def group_words(pieces: Sequence[str]) -> list[list[int]]:
    """Token indices of each word: a piece that starts with a space starts a word, punctuation
    attaches to the word before it (as openai-whisper's ``merge_punctuations`` for English).

    >>> group_words([" The", " wea", "ther", ",", " ok", "."])
    [[0], [1, 2, 3], [4, 5]]
    """
    words: list[list[int]] = []
    for i, p in enumerate(pieces):
        if words and (not p.startswith(" ") or _PUNCT.match(p.strip() or "x")):
            words[-1].append(i)
        else:
            words.append([i])
    return words


def words_from_tokens(pieces: Sequence[str], starts: Tensor, end: float) -> list[Word]:
    """Words with start and end (s) from token pieces and each token's start; a word ends where the
    next one starts (the last at ``end``).

    >>> words_from_tokens([" a", " b", "c"], torch.tensor([0.0, 0.5, 0.7]), 1.0)
    [('a', 0.0, 0.5), ('bc', 0.5, 1.0)]
    """
    groups = group_words(pieces)
    out: list[Word] = []
    for k, g in enumerate(groups):
        stop = float(starts[groups[k + 1][0]]) if k + 1 < len(groups) else float(end)
        out.append(("".join(pieces[i] for i in g).strip(), float(starts[g[0]]), max(stop, float(starts[g[0]]))))
    return out


def normalize_word(w: str) -> str:
    """Lower case, letters, digits and apostrophes only.

    >>> normalize_word(" Tomorrow,")
    'tomorrow'
    """
    return re.sub(r"[^a-z0-9']", "", w.lower())


def _match_words(reference: Sequence[Word], hypothesis: Sequence[str]) -> tuple[list[int], dict[int, int]]:
    """The reference's words (each unit split on spaces) matched to ``hypothesis`` words by a
    longest-common-subsequence alignment of normalised words: ``owner[k]`` is the unit of reference
    word ``k``, ``match[k]`` its hypothesis word."""
    from difflib import SequenceMatcher

    hyp = [normalize_word(w) for w in hypothesis]
    ref_words: list[str] = []
    owner: list[int] = []
    for u, (text, _, _) in enumerate(reference):
        for w in text.split():
            ref_words.append(normalize_word(w))
            owner.append(u)
    match: dict[int, int] = {}
    for a, b, size in SequenceMatcher(None, ref_words, hyp, autojunk=False).get_matching_blocks():
        for d in range(size):
            match[a + d] = b + d
    return owner, match


def boundary_errors(predicted: Sequence[Word], reference: Sequence[Word]) -> list[float]:
    """Absolute start and end errors (s) of the reference units the prediction got right.

    A reference unit may hold several words ("in the"); it counts when its words appear, in order,
    in the predicted words matched to the reference by a longest-common-subsequence alignment of
    normalised words. Its predicted span runs from the first word's start to the last word's end.

    >>> boundary_errors([("in", 1.0, 1.1), ("the", 1.1, 1.3)], [("in the", 0.9, 1.2)])
    [0.09999999999999998, 0.10000000000000009]
    """
    owner, match = _match_words(reference, [w for w, _, _ in predicted])
    errors: list[float] = []
    for u, (_, start, end) in enumerate(reference):
        idx = [k for k, o in enumerate(owner) if o == u]
        if not idx or any(k not in match for k in idx):
            continue
        hs = [match[k] for k in idx]
        if hs != list(range(hs[0], hs[0] + len(hs))):
            continue
        errors += [abs(predicted[hs[0]][1] - start), abs(predicted[hs[-1]][2] - end)]
    return errors


def timing_summary(errors: Sequence[float]) -> dict[str, float]:
    """Mean boundary error (ms) and the shares within 50 and 100 ms.

    >>> timing_summary([0.01, 0.07])
    {'mae_ms': 40.0, 'within_50ms': 0.5, 'within_100ms': 1.0, 'boundaries': 2}
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        return {"mae_ms": float("nan"), "within_50ms": float("nan"), "within_100ms": float("nan"), "boundaries": 0}
    return {
        "mae_ms": round(float(e.mean() * 1000), 6),
        "within_50ms": float((e <= 0.05 + 1e-9).mean()),
        "within_100ms": float((e <= 0.1 + 1e-9).mean()),
        "boundaries": int(e.size),
    }


def select_heads_by_agreement(grid: Tensor, k: int | None = None) -> list[list[int]]:
    """Heads of an agreement grid ``[L, H]``, best first: the ``k`` best, or those at or above the mean.

    >>> select_heads_by_agreement(torch.tensor([[0.1, 0.5], [0.3, 0.2]]))
    [[0, 1], [1, 0]]
    """
    flat = grid.flatten().double()
    order = [int(i) for i in torch.argsort(torch.nan_to_num(flat, nan=-2.0), descending=True)]
    if k is None:
        mean = float(flat.nanmean())
        order = [i for i in order if float(flat[i]) >= mean]
    else:
        order = order[: max(1, int(k))]
    num_heads = grid.shape[1]
    return [[i // num_heads, i % num_heads] for i in order]


def token_spans(pieces: Sequence[str], reference: Sequence[Word]) -> list[tuple[float, float] | None]:
    """The true time span (s) of each token: that of the reference unit its word belongs to (words
    grouped as :func:`group_words`, matched to the reference as :func:`boundary_errors` does);
    ``None`` for a token whose word the reference does not have.

    >>> token_spans([" in", " the", " par", "k", " now"], [("in the", 0.5, 0.7), ("park", 0.7, 1.1)])
    [(0.5, 0.7), (0.5, 0.7), (0.7, 1.1), (0.7, 1.1), None]
    """
    groups = group_words(pieces)
    owner, match = _match_words(reference, ["".join(pieces[i] for i in g) for g in groups])
    unit_of_group = {h: owner[k] for k, h in match.items()}
    spans: list[tuple[float, float] | None] = [None] * len(pieces)
    for g_idx, g in enumerate(groups):
        if g_idx in unit_of_group:
            _, start, end = reference[unit_of_group[g_idx]]
            for i in g:
                spans[i] = (float(start), float(end))
    return spans


def span_target(
    spans: Sequence[tuple[float, float] | None],
    num_frames: int,
    frame_seconds: float = WHISPER_FRAME_SECONDS,
    ramp_frames: int = 2,
) -> Tensor:
    """Where each token's attention should be: ``[I, num_frames]``, each row a distribution uniform
    over the frames of the token's span, falling linearly to zero over ``ramp_frames`` frames on
    either side (a boundary is known to a frame or two); an all-zero row for a ``None`` span.

    >>> span_target([(0.04, 0.08), None], 6, 0.02, ramp_frames=0)
    tensor([[0.0000, 0.0000, 0.5000, 0.5000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000]])
    """
    if ramp_frames < 0:
        raise ValueError(f"Expected ramp_frames >= 0 but got {ramp_frames}.")
    t = torch.arange(num_frames, dtype=torch.float64)
    out = torch.zeros(len(spans), num_frames, dtype=torch.float64)
    for i, span in enumerate(spans):
        if span is None:
            continue
        first = math.floor(span[0] / frame_seconds + 1e-6)
        last = max(first, math.ceil(span[1] / frame_seconds - 1e-6) - 1)
        dist = (first - t).clamp(min=0) + (t - last).clamp(min=0)  # frames outside the span
        row = (1.0 - dist / (ramp_frames + 1)).clamp(min=0)
        if row.sum() > 0:
            out[i] = row / row.sum()
    return out.float()


def alignment_kl(attention: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean ``KL(target || attention)`` over the tokens with a target row and over any leading
    dimensions (heads): ``attention [..., I, T]`` (rows summing to 1, e.g. cross-attention weights),
    ``target [I, T]`` from :func:`span_target`. Zero when every row puts its mass where the target
    does; differentiable in ``attention``.

    >>> q = span_target([(0.0, 0.04)], 4, 0.02, ramp_frames=0)
    >>> float(alignment_kl(q.unsqueeze(0), q)), float(alignment_kl(torch.full((1, 1, 4), 0.25), q)) > 0
    (0.0, True)
    """
    rows = target.sum(-1) > 0
    if attention.shape[-2:] != target.shape:
        raise ValueError(f"attention {tuple(attention.shape)} does not end in the target's shape {tuple(target.shape)}.")
    if not bool(rows.any()):
        return attention.sum() * 0.0
    q = target[rows].to(attention.dtype)
    a = attention[..., rows, :]
    kl = (q * (q.clamp(min=eps).log() - a.clamp(min=eps).log())).sum(-1)
    return kl.mean()
