"""Pure tensor maths: aggregation, normalisation, pooling and agreement. Knows no model."""

from xattn_lightning.functional.aggregate import (
    aggregate_attention,
    framewise_zscore,
    resolve_layers,
    tokenwise_zscore,
)
from xattn_lightning.functional.agreement import (
    AUTO_RELIABILITY_TARGET,
    MASK_LADDER,
    RELIABILITY_FLOOR,
    agreement,
    agreement_grid,
    bootstrap_mean_ci,
    choose_n_masks,
    correlation,
    deletion_auc,
    disattenuate,
    map_similarity,
    masks_for_reliability,
    per_token_correlation,
    split_half_reliability,
    topk_overlap,
)
from xattn_lightning.functional.pooling import pool_saliency, smooth_frames

__all__ = [
    "AUTO_RELIABILITY_TARGET",
    "MASK_LADDER",
    "RELIABILITY_FLOOR",
    "aggregate_attention",
    "agreement",
    "agreement_grid",
    "bootstrap_mean_ci",
    "choose_n_masks",
    "correlation",
    "deletion_auc",
    "disattenuate",
    "framewise_zscore",
    "map_similarity",
    "masks_for_reliability",
    "per_token_correlation",
    "pool_saliency",
    "smooth_frames",
    "resolve_layers",
    "split_half_reliability",
    "tokenwise_zscore",
    "topk_overlap",
]
