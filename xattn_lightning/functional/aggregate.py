"""Aggregation of cross-attention over layers and heads, and the paper's normalisations.

Cross-attention tensors use the layout ``[L, H, I, T']``: decoder layers, heads, explained
tokens, encoder frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError

LayerSpec = int | str | Sequence[int] | None
HeadSpec = int | Sequence[int] | None


def _check_attention(ca: Tensor) -> None:
    if not isinstance(ca, Tensor):
        raise TypeError(f"Expected cross-attention to be a torch.Tensor but got {type(ca).__name__}.")
    if ca.dim() != 4:
        raise XAttnError(
            f"Expected cross-attention of shape [layers, heads, tokens, frames] (4-D) but got shape {tuple(ca.shape)}."
        )


def resolve_layers(layers: LayerSpec, num_layers: int) -> list[int]:
    """Turn a layer selection into a sorted list of non-negative layer indices.

    ``layers`` is ``None`` or ``"all"`` (every layer), ``"last"`` (the last layer), ``"last_k"``
    such as ``"last_2"``, an int (negative counts from the end) or a sequence of ints.

    >>> resolve_layers("last_2", 4)
    [2, 3]
    >>> resolve_layers([-1, 0], 4)
    [0, 3]
    """
    if num_layers < 1:
        raise XAttnError(f"Expected at least one decoder layer but got {num_layers}.")
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        if layers == "last":
            return [num_layers - 1]
        if layers.startswith("last_"):
            try:
                k = int(layers.split("_", 1)[1])
            except ValueError:
                k = 0
            if not 1 <= k <= num_layers:
                raise XAttnError(f"Expected 'last_k' with 1 <= k <= {num_layers} but got {layers!r}.")
            return list(range(num_layers - k, num_layers))
        raise XAttnError(
            f"Unknown layer preset {layers!r}. Use 'all', 'last', 'last_k' (e.g. 'last_2'), an int or a list of ints."
        )
    return _indices(layers, num_layers, "layer", f"a decoder with {num_layers} layers")


def _resolve_heads(heads: HeadSpec, num_heads: int) -> list[int]:
    if heads is None or heads == "all":
        return list(range(num_heads))
    return _indices(heads, num_heads, "head", f"layers with {num_heads} heads")


def _indices(spec: int | Sequence[int], count: int, kind: str, within: str) -> list[int]:
    """The sorted non-negative indices of ``spec`` (an int or ints, negative from the end) among ``count``
    ``kind``s (``within`` names them in the error)."""
    idx = [spec] if isinstance(spec, int) else list(spec)
    if not idx:
        raise XAttnError(f"Expected a non-empty {kind} selection but got an empty list.")
    out = set()
    for i in idx:
        if not isinstance(i, int) or not -count <= i < count:
            raise XAttnError(f"{kind.capitalize()} index {i!r} is out of range for {within}.")
        out.add(i % count)
    return sorted(out)


def aggregate_attention(
    ca: Tensor,
    layers: LayerSpec = None,
    heads: HeadSpec = None,
    pairs: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Mean cross-attention over a set of (layer, head) pairs (paper §2.2), giving ``[I, T']``.

    Either ``layers``/``heads`` (their Cartesian product) or explicit ``pairs`` such as
    Whisper's ``generation_config.alignment_heads``.

    >>> ca = torch.rand(4, 6, 3, 10)
    >>> aggregate_attention(ca).shape
    torch.Size([3, 10])
    >>> torch.allclose(aggregate_attention(ca, layers=1, heads=2), ca[1, 2])
    True
    >>> torch.allclose(aggregate_attention(ca, pairs=[(1, 0), (2, 5)]), (ca[1, 0] + ca[2, 5]) / 2)
    True
    """
    _check_attention(ca)
    num_layers, num_heads = ca.shape[0], ca.shape[1]
    if pairs is not None:
        if layers is not None or heads is not None:
            raise XAttnError("Pass either `pairs` or `layers`/`heads`, not both.")
        pairs = [tuple(p) for p in pairs]
        if not pairs:
            raise XAttnError("Expected a non-empty list of (layer, head) pairs but got an empty one.")
        sel = []
        for p in pairs:
            if len(p) != 2:
                raise XAttnError(f"Expected (layer, head) pairs but got {p!r}.")
            (li,) = resolve_layers(int(p[0]), num_layers)
            (hi,) = _resolve_heads(int(p[1]), num_heads)
            sel.append(ca[li, hi])
        return torch.stack(sel).mean(0)
    layer_ids = resolve_layers(layers, num_layers)
    head_ids = _resolve_heads(heads, num_heads)
    return ca[layer_ids][:, head_ids].mean(dim=(0, 1))


def _zscore(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    x = x.double() if x.dtype == torch.float64 else x.float()
    mean = x.mean(dim=dim, keepdim=True)
    centred = x - mean
    n = 1
    for d in (dim,) if isinstance(dim, int) else dim:
        n *= x.shape[d]
    if n < 2:
        return torch.zeros_like(x)
    std = centred.pow(2).sum(dim=dim, keepdim=True).div(n - 1).sqrt()
    # A constant slice has no spread: it carries no information and becomes all zeros.
    # NaN inputs stay NaN (never silently zeroed), so the correlation reports them as undefined.
    safe = torch.where(std == 0, torch.ones_like(std), std)
    return torch.where(std == 0, torch.zeros_like(centred), centred / safe)


def framewise_zscore(ca: Tensor) -> Tensor:
    """Paper §1.6: z-score attention per encoder frame (each column, across tokens).

    Removes "sink" frames that receive high attention for every token. Works on ``[..., I, T']``;
    a constant column becomes zeros.

    >>> z = framewise_zscore(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    >>> z[:, 0].tolist(), z[:, 1].tolist()
    ([-0.7071067690849304, 0.7071067690849304], [0.0, 0.0])
    """
    if ca.dim() < 2:
        raise XAttnError(f"Expected attention of shape [..., tokens, frames] but got {tuple(ca.shape)}.")
    return _zscore(ca, dim=-2)


def tokenwise_zscore(sm: Tensor) -> Tensor:
    """Paper §1.6 (SPES ``single_mean_std``): z-score each token's saliency map over all its entries.

    Works on ``[I, ...]``; a constant map becomes zeros.

    >>> tokenwise_zscore(torch.tensor([[0.0, 2.0], [1.0, 1.0]])).tolist()
    [[-0.7071067690849304, 0.7071067690849304], [0.0, 0.0]]
    """
    if sm.dim() < 2:
        raise XAttnError(f"Expected saliency of shape [tokens, ...] but got {tuple(sm.shape)}.")
    return _zscore(sm, dim=tuple(range(1, sm.dim())))
