"""Typed options of the saliency method families, with their defaults in one place.

``xl.explain``, the monitor and the CLI take these names as keyword options; the functions of
:mod:`xattn_lightning.saliency.perturbation` and :mod:`~xattn_lightning.saliency.gradients` take
their defaults from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar, get_args

#: mask designs: ``plain`` (independent draws), ``antithetic`` (each mask and its complement;
#: p = 0.5 only), ``balanced`` (each unit occluded in exactly round(p·N) masks, at random positions:
#: a Latin-hypercube design per unit), ``sobol`` (scrambled Sobol points thresholded at p)
Sampling = Literal["plain", "antithetic", "balanced", "sobol"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)
Autocast = Literal["bf16", "fp16"]
#: how a masked pass's logits over the vocabulary are made (``encoder_spes``): ``exact`` (float32) or ``bf16``
#: (bfloat16, each position's most probable unmasked tokens exact; :mod:`xattn_lightning.saliency.vocabulary`)
Vocabulary = Literal["exact", "bf16"]
VOCABULARIES: tuple[str, ...] = get_args(Vocabulary)
BatchSize = int | Literal["auto"]


@dataclass(frozen=True)
class PerturbationOptions:
    """Options every perturbation (mask) method takes."""

    n_masks: int = 500
    seed: int = 0
    sampling: Sampling = "plain"
    max_seconds: float | None = None
    autocast: Autocast | None = None


@dataclass(frozen=True)
class SpesOptions(PerturbationOptions):
    """Input-space SPES: SLIC segments of the spectrogram at several ``scales`` (segments per
    ``frame_rate`` seconds... see :func:`~xattn_lightning.saliency.perturbation.segment_counts`)."""

    p: float = 0.5
    batch_size: BatchSize = 8
    scales: tuple[int, ...] = (2000, 2500, 3000)
    frame_rate: float | None = None  # None: the adapter's (Adapter.frame_rate)
    compactness: float = 0.1
    sigma: float = 0.0


@dataclass(frozen=True)
class EncoderSpesOptions(PerturbationOptions):
    """Encoder-output SPES: whole encoder frames occluded with probability ``p_h``; ``smoothing``
    (an odd width, 0 = off, the paper's estimator) filters the map in time
    (:func:`~xattn_lightning.functional.smooth_frames`). ``encoder_batch_size="auto"`` takes as many
    masks per batch as fit :data:`~xattn_lightning.saliency.perturbation.CPU_ROWS_PER_BATCH` explained
    tokens off CUDA, and as many as fit the free memory on CUDA. ``vocabulary`` (:data:`Vocabulary`) says how
    the masked passes' logits are made."""

    p_h: float = 0.7
    encoder_batch_size: BatchSize = "auto"
    smoothing: int = 0
    vocabulary: Vocabulary = "exact"


@dataclass(frozen=True)
class GradientOptions:
    """Gradient methods (Captum Saliency, InputXGradient, IntegratedGradients)."""

    n_steps: int = 16
    internal_batch_size: int | None = None
    gradient_engine: Literal["batched", "captum"] = "batched"


FAMILIES: tuple[type, ...] = (SpesOptions, EncoderSpesOptions, GradientOptions)

#: what a monitor reading and ``xattn-lightning compare`` use where ``explain`` defaults differ: the mask
#: count chosen once from a first reading at 256 masks, as the smallest of 256, 512, 1,024 and 2,048 whose
#: maps reach a split-half reliability of 0.5 (:func:`xattn_lightning.functional.choose_n_masks`), then
#: fixed, so that every reading gets a corrected headline and readings stay comparable
READING_DEFAULTS: dict[str, Any] = {"n_masks": "auto", "seed": 0}

T = TypeVar("T")


def default_options() -> dict[str, Any]:
    """Every option name with its default (the union of the families).

    >>> default_options()["p_h"], default_options()["n_steps"]
    (0.7, 16)
    """
    out: dict[str, Any] = {}
    for cls in FAMILIES:
        for f in fields(cls):
            out.setdefault(f.name, f.default)
    return out


def options_for(cls: type[T], options: dict[str, Any]) -> T:  # cls: one of the FAMILIES dataclasses
    """The ``cls`` options object from a flat dict of keyword options (other names ignored).

    >>> options_for(EncoderSpesOptions, {"n_masks": 64, "n_steps": 4}).n_masks
    64
    """
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in options.items() if k in names})


def as_kwargs(options: Any, *drop: str) -> dict[str, Any]:
    """The options object as keyword arguments, without the names in ``drop``."""
    return {k: v for k, v in asdict(options).items() if k not in drop}
