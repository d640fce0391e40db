"""Resolution matching (paper §1.5): pool input-space saliency ``[I, T, F]`` to encoder frames ``[I, T']``."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from xattn_lightning.errors import XAttnError, check_choice

#: pooling of input-space saliency to encoder frames (``Pooling`` for type checkers)
Pooling = Literal["max2d", "avg2d", "max_mean"]
POOLING_MODES: tuple[str, ...] = get_args(Pooling)


def pool_saliency(sm: Tensor, frames_per_step: int, num_frames: int | None = None, mode: Pooling = "max2d") -> Tensor:
    """Pool a ``[I, T, F]`` saliency map to ``[I, T']`` over non-overlapping windows of
    ``frames_per_step`` input frames × all frequency bins.

    Modes: ``"max2d"`` (paper default: max over the window and frequency), ``"avg2d"`` (mean over
    both), ``"max_mean"`` (max over frequency, then mean over the window's frames).
    ``num_frames`` (T') defaults to ``ceil(T / frames_per_step)``; a last, partial window pools
    only the frames it has.

    >>> sm = torch.arange(8.0).reshape(1, 4, 2)
    >>> pool_saliency(sm, 2).tolist()
    [[3.0, 7.0]]
    >>> pool_saliency(sm, 2, mode="avg2d").tolist()
    [[1.5, 5.5]]
    """
    check_choice("pooling mode", mode, POOLING_MODES)
    if sm.dim() != 3:
        raise XAttnError(f"Expected input saliency of shape [tokens, time, freq] but got {tuple(sm.shape)}.")
    if not isinstance(frames_per_step, int) or frames_per_step < 1:
        raise XAttnError(f"Expected frames_per_step to be a positive int but got {frames_per_step!r}.")
    i, t, _ = sm.shape
    if t == 0:
        raise XAttnError("Cannot pool a saliency map with zero time frames.")
    s = frames_per_step
    if num_frames is None:
        num_frames = math.ceil(t / s)
    if num_frames < 1:
        raise XAttnError(f"Expected num_frames >= 1 but got {num_frames}.")
    x = sm.float()[:, : num_frames * s]  # frames past the last window are left out
    # ceil_mode: a last, partial window pools only the frames it has (the mean divides by those)
    if mode == "max2d":
        out = F.max_pool2d(x.unsqueeze(1), (s, x.shape[-1]), ceil_mode=True).flatten(1)
    elif mode == "avg2d":
        out = F.avg_pool2d(x.unsqueeze(1), (s, x.shape[-1]), ceil_mode=True).flatten(1)
    else:
        out = F.avg_pool1d(x.amax(-1).unsqueeze(1), s, ceil_mode=True).flatten(1)
    # windows entirely past the input (T' larger than the input allows) carry no saliency
    return F.pad(out, (0, num_frames - out.shape[1]))


def broadcast_to_input(ca: Tensor, frames_per_step: int, num_input_frames: int, num_bins: int) -> Tensor:
    """Repeat an ``[I, T']`` map over each encoder step's input frames and all bins: ``[I, T, F]``.

    The inverse of pooling used to rank input cells by attention (deletion/insertion).

    >>> broadcast_to_input(torch.tensor([[1.0, 2.0]]), 2, 3, 1).squeeze(-1).tolist()
    [[1.0, 1.0, 2.0]]
    """
    if ca.dim() != 2:
        raise XAttnError(f"Expected a [tokens, frames] map but got {tuple(ca.shape)}.")
    rep = ca.repeat_interleave(frames_per_step, dim=1)[:, :num_input_frames]
    if rep.shape[1] < num_input_frames:
        rep = F.pad(rep, (0, num_input_frames - rep.shape[1]))
    return rep.unsqueeze(-1).expand(-1, -1, num_bins)


def check_smoothing(width: object) -> None:
    """Raise unless ``width`` is a valid ``smoothing`` option: 0 or 1 (off), or an odd kernel width.

    >>> check_smoothing(5)
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 0 or (width > 1 and width % 2 == 0):
        raise XAttnError(f"Expected smoothing to be 0 (off) or an odd kernel width such as 3 or 5, got {width!r}.")


def smooth_frames(x: Tensor, width: int) -> Tensor:
    """Filter maps ``[..., T']`` along their last (time) axis with a binomial kernel of odd
    ``width`` (3: [1, 2, 1] / 4, 5: [1, 4, 6, 4, 1] / 16, ...); the edges repeat the end frames.
    ``width`` 0 or 1 returns ``x`` unchanged.

    Encoder-output saliency maps from few masks are noisy frame by frame while relevance changes
    smoothly over 20-ms encoder frames; filtering trades a little temporal detail for much less
    noise (``benchmarks/estimators.py``).

    >>> smooth_frames(torch.tensor([[0.0, 4.0, 0.0]]), 3).tolist()
    [[1.0, 2.0, 1.0]]
    """
    check_smoothing(width)
    if width <= 1:
        return x
    taps = torch.tensor([math.comb(width - 1, k) for k in range(width)], dtype=x.dtype, device=x.device)
    flat = x.reshape(-1, 1, x.shape[-1])
    half = width // 2
    padded = F.pad(flat, (half, half), mode="replicate")
    return F.conv1d(padded, (taps / taps.sum()).view(1, 1, -1)).reshape(x.shape)
