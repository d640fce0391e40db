"""What a saliency method returns for one utterance: :class:`SaliencyResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from xattn_lightning.saliency.perturbation import MaskState


@dataclass
class SaliencyResult:
    """One method's map for one utterance, and how it was made.

    ``map`` is ``[I, T, F]`` (input space) or ``[I, T']`` (encoder space). Perturbation methods add
    ``halves`` (the maps of the even and of the odd masks, ``[2, ...]``: their agreement measures the
    map's reliability), ``n_masks`` (how many ran) and ``budget_hit`` (``max_seconds`` stopped the loop);
    ``details`` holds a method's own facts (SLIC segment counts, batch size, smoothing); ``state`` is where
    the masks stopped (:class:`~xattn_lightning.saliency.perturbation.MaskState`), to continue the map
    with more masks (``resume=`` of :func:`xattn_lightning.explain`).

    Example:
        >>> import torch
        >>> r = SaliencyResult(torch.zeros(2, 5), seconds=0.1, n_masks=8)
        >>> r.n_masks, r.halves is None
        (8, True)
    """

    map: Tensor
    seconds: float
    halves: Tensor | None = None
    n_masks: int | None = None
    budget_hit: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    state: MaskState | None = None
