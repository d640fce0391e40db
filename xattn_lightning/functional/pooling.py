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
    need = num_frames * s
    x = sm.float()
    if need > t:
        pad_val = float("-inf") if mode != "avg2d" else float("nan")
        x = F.pad(x, (0, 0, 0, need - t), value=pad_val)
    else:
        x = x[:, :need]
    if mode == "max2d":
        out = x.reshape(i, num_frames, s * x.shape[-1]).amax(-1)
    elif mode == "avg2d":
        out = x.reshape(i, num_frames, -1).nanmean(-1)
    else:
        per_frame = x.amax(-1).reshape(i, num_frames, s)
        valid = torch.isfinite(per_frame)
        out = torch.where(valid, per_frame, torch.zeros_like(per_frame)).sum(-1) / valid.sum(-1).clamp(min=1)
    # windows entirely past the input (T' larger than the input allows) carry no saliency
    return torch.nan_to_num(out, nan=0.0, neginf=0.0)


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
