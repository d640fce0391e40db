"""Saliency methods: :mod:`~xattn_lightning.saliency.registry` names them and checks options,
:mod:`~xattn_lightning.saliency.methods` holds their bodies, :mod:`~xattn_lightning.saliency.batching` sizes and
casts the mask batches, :mod:`~xattn_lightning.saliency.driver` runs the asked ones over one utterance
(``compute_saliency`` returns a :class:`~xattn_lightning.saliency.result.SaliencyResult` per method); the mask loops are in
:mod:`~xattn_lightning.saliency.perturbation`, the gradients in :mod:`~xattn_lightning.saliency.gradients`."""

from xattn_lightning.saliency.batching import (
    AUTO_MAX_BATCH,
    AUTO_MEMORY_SHARE,
    AUTOCAST_DTYPES,
    CPU_BATCH_SIZES,
    auto_batch_size,
)
from xattn_lightning.saliency.driver import compute_saliency
from xattn_lightning.saliency.gradients import GRADIENT_METHODS
from xattn_lightning.saliency.options import SaliencyOptions
from xattn_lightning.saliency.perturbation import spes_encoder, spes_input
from xattn_lightning.saliency.registry import (
    METHODS,
    MethodName,
    MethodSpec,
    list_methods,
    perturbation_methods,
    validate_methods,
)
from xattn_lightning.saliency.result import SaliencyResult

__all__ = [
    "AUTOCAST_DTYPES",
    "AUTO_MAX_BATCH",
    "AUTO_MEMORY_SHARE",
    "CPU_BATCH_SIZES",
    "GRADIENT_METHODS",
    "METHODS",
    "SaliencyOptions",
    "SaliencyResult",
    "MethodName",
    "MethodSpec",
    "auto_batch_size",
    "compute_saliency",
    "list_methods",
    "perturbation_methods",
    "spes_encoder",
    "spes_input",
    "validate_methods",
]
