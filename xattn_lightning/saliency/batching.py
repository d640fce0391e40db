"""Mask batches: how many perturbed passes run at once (``"auto"``: what the free GPU memory holds; a fixed
count off CUDA) and in which precision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.saliency.options import PerturbationOptions
from xattn_lightning.saliency.perturbation import PartlyExactLogits, rows_batch_size

#: the batch size that ``batch_size="auto"`` uses off CUDA (``encoder_batch_size="auto"`` off CUDA:
#: :func:`~xattn_lightning.saliency.perturbation.rows_batch_size`)
CPU_BATCH_SIZES: dict[str, int] = {"spes": 8}


#: the share of free GPU memory that ``"auto"`` batch sizes may fill, and their upper bound
AUTO_MEMORY_SHARE = 0.6


AUTO_MAX_BATCH = 1024


AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, name: str | None) -> Any:
    """``torch.autocast`` for the perturbed passes (``None``: full precision)."""
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[name])


def auto_batch_size(run_batch: Callable[[int], Any], n_masks: int, device: torch.device, cpu_default: int) -> int:
    """A mask batch size that fits the free GPU memory.

    Measures the peak memory of one perturbed pass at batch 1 and at batch 4, and takes as many masks
    per batch as :data:`AUTO_MEMORY_SHARE` of the free memory holds (at most ``n_masks`` and
    :data:`AUTO_MAX_BATCH`). Off CUDA it returns ``cpu_default`` (batching barely helps on CPU).

    >>> auto_batch_size(lambda b: None, 100, torch.device("cpu"), 8)
    8
    """
    if device.type != "cuda":
        return max(1, min(cpu_default, n_masks))
    peaks = []
    for b in (1, 4):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            run_batch(b)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_mask = max((peaks[1] - peaks[0]) / 3.0, peaks[0] / 4.0, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(n_masks, AUTO_MAX_BATCH, (AUTO_MEMORY_SHARE * free) // per_mask)))


def prepared(
    method: str,
    run: Callable[[Tensor], Tensor],
    unmasked: Callable[[int], Tensor],
    logp_ref: Tensor,
    device: torch.device,
    options: PerturbationOptions,
    batch_size: int | str,
) -> tuple[Callable[[Tensor], Tensor], Tensor, int]:
    """What both perturbation families share: the perturbed pass in the asked precision (``options.autocast``),
    its unperturbed reference and the mask batch size (``batch_size``, ``"auto"`` resolved)."""

    def cast_run(x: Tensor) -> Tensor:
        with autocast(device, options.autocast):
            out = run(x)
        return out if isinstance(out, PartlyExactLogits) else out.float()  # (partly exact: the KL converts rows)

    # under autocast the unperturbed reference is taken in the same precision, so that the KL of an
    # unmasked pass stays zero
    lp_ref = cast_run(unmasked(1))[0].log_softmax(-1) if options.autocast else logp_ref
    n_masks = int(options.n_masks)
    if batch_size == "auto":
        cpu = rows_batch_size(lp_ref.shape[0], n_masks) if method == "encoder_spes" else CPU_BATCH_SIZES[method]
        return cast_run, lp_ref, auto_batch_size(lambda b: cast_run(unmasked(b)), n_masks, device, cpu)
    return cast_run, lp_ref, int(batch_size)
