"""Typed options of the saliency methods: one validated dataclass per method family, held together by
:class:`SaliencyOptions`, each default in one place.

``xl.explain``, the monitor, ``compare`` and the CLI take these options as flat keywords (``n_masks=...``,
``p_h=...``); :meth:`SaliencyOptions.from_flat` turns them into one object, checked once, and every method
is handed its own family's object (:meth:`SaliencyOptions.family`).

Example:
    >>> o = SaliencyOptions.from_flat(n_masks=64, p_h=0.5)
    >>> o.encoder_spes.n_masks, o.encoder_spes.p_h, o.spes.n_masks, o.gradient.n_steps
    (64, 0.5, 64, 16)
    >>> SaliencyOptions.from_flat(n_mask=64)
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.UnknownNameError: Unknown option 'n_mask'. Valid options are: ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from xattn_lightning.errors import UnknownNameError, XAttnError, check_choice

#: mask designs: ``plain`` (independent draws), ``antithetic`` (each mask and its complement;
#: p = 0.5 only), ``balanced`` (each unit occluded in exactly round(p·N) masks, at random positions:
#: a Latin-hypercube design per unit), ``sobol`` (scrambled Sobol points thresholded at p)
Sampling = Literal["plain", "antithetic", "balanced", "sobol"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)
Autocast = Literal["bf16", "fp16"]
AUTOCASTS: tuple[str, ...] = get_args(Autocast)
#: how a masked pass's logits over the vocabulary are made (``encoder_spes``): ``exact`` (float32), ``bf16``
#: (bfloat16, each position's most probable unmasked tokens exact; :mod:`xattn_lightning.saliency.vocabulary`)
#: or ``auto`` (the default: ``bf16`` where it was measured to pay, a CPU with AMX units and a linear output
#: head, else ``exact``; :func:`~xattn_lightning.saliency.vocabulary.resolve_vocabulary`)
Vocabulary = Literal["auto", "exact", "bf16"]
VOCABULARIES: tuple[str, ...] = get_args(Vocabulary)
GradientEngine = Literal["batched", "captum"]
BatchSize = int | Literal["auto"]
MaskCount = int | Literal["auto"]


def _positive_int(name: str, v: object, auto: bool = False) -> None:
    if auto and v == "auto":
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise XAttnError(f"Expected {name} to be a positive int{' or ' + repr('auto') if auto else ''} but got {v!r}.")


def _fraction(name: str, v: object) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < float(v) < 1.0:
        raise XAttnError(f"Expected {name} in (0, 1), a probability, but got {v!r}.")


#: masks per perturbation map of ``xl.explain`` (the monitor and ``compare`` choose theirs: :data:`READING_N_MASKS`)
DEFAULT_N_MASKS = 500


@dataclass(frozen=True)
class PerturbationOptions:
    """Options every perturbation (mask) method takes. ``n_masks="auto"`` is a policy of the monitor and
    ``compare`` (chosen from a first reading); :func:`xattn_lightning.explain` needs a number."""

    n_masks: MaskCount = DEFAULT_N_MASKS
    seed: int = 0
    sampling: Sampling = "plain"
    max_seconds: float | None = None
    autocast: Autocast | None = None

    def __post_init__(self) -> None:
        _positive_int("n_masks", self.n_masks, auto=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise XAttnError(f"Expected seed to be an int but got {self.seed!r}.")
        check_choice("sampling", self.sampling, SAMPLINGS)
        if self.autocast is not None:
            check_choice("autocast", self.autocast, AUTOCASTS)
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise XAttnError(f"Expected max_seconds > 0 (seconds per method and utterance) or None, got {self.max_seconds!r}.")


@dataclass(frozen=True)
class SpesOptions(PerturbationOptions):
    """Input-space SPES: SLIC segments of the spectrogram at several ``scales`` (segments per
    utterance length, see :func:`~xattn_lightning.saliency.perturbation.segment_counts`)."""

    p: float = 0.5
    batch_size: BatchSize = 8
    scales: tuple[int, ...] = (2000, 2500, 3000)
    compactness: float = 0.1
    sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("p", self.p)
        _positive_int("batch_size", self.batch_size, auto=True)
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))


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
    vocabulary: Vocabulary = "auto"

    def __post_init__(self) -> None:
        from xattn_lightning.functional.pooling import check_smoothing

        super().__post_init__()
        _fraction("p_h", self.p_h)
        _positive_int("encoder_batch_size", self.encoder_batch_size, auto=True)
        check_smoothing(self.smoothing)
        check_choice("vocabulary", self.vocabulary, VOCABULARIES)
        if self.autocast is not None and self.vocabulary == "bf16":
            raise XAttnError("autocast and vocabulary='bf16' both lower the precision of the masked passes: choose one.")


@dataclass(frozen=True)
class GradientOptions:
    """Gradient methods (Captum Saliency, InputXGradient, IntegratedGradients)."""

    n_steps: int = 16
    internal_batch_size: int | None = None
    gradient_engine: GradientEngine = "batched"

    def __post_init__(self) -> None:
        _positive_int("n_steps", self.n_steps)
        if self.internal_batch_size is not None:
            _positive_int("internal_batch_size", self.internal_batch_size)
        check_choice("gradient_engine", self.gradient_engine, get_args(GradientEngine))


#: the family objects :class:`SaliencyOptions` holds, by its field name
FAMILIES: dict[str, type] = {"spes": SpesOptions, "encoder_spes": EncoderSpesOptions, "gradient": GradientOptions}


@dataclass(frozen=True)
class SaliencyOptions:
    """Every saliency option of a reading: one validated object per method family, and ``frame_rate``
    (input frames per second: SPES segmentation, word timestamps, figures; ``None``: the model's own,
    ``Adapter.frame_rate``). Build it from flat keywords with :meth:`from_flat`.

    Example:
        >>> SaliencyOptions().with_masks(1024).encoder_spes.n_masks
        1024
    """

    spes: SpesOptions = field(default_factory=SpesOptions)
    encoder_spes: EncoderSpesOptions = field(default_factory=EncoderSpesOptions)
    gradient: GradientOptions = field(default_factory=GradientOptions)
    frame_rate: float | None = None

    def __post_init__(self) -> None:
        if self.frame_rate is not None and not self.frame_rate > 0:
            raise XAttnError(f"Expected frame_rate > 0 (input frames per second) or None, got {self.frame_rate!r}.")

    @classmethod
    def from_flat(cls, **options: Any) -> SaliencyOptions:
        """The options from flat keywords: each name goes to every family that takes it (``n_masks`` to both
        SPES families); an unknown name fails, listing the valid ones."""
        valid = flat_names()
        for k in options:
            if k not in valid:
                raise UnknownNameError("option", k, valid)
        parts = {
            name: family(**{f.name: options[f.name] for f in fields(family) if f.name in options})
            for name, family in FAMILIES.items()
        }
        return cls(**parts, frame_rate=options.get("frame_rate"))

    def family(self, name: str) -> Any:
        """The options object of the family ``name`` (``"spes"``, ``"encoder_spes"``, ``"gradient"``)."""
        return getattr(self, name)

    def with_masks(self, n_masks: int) -> SaliencyOptions:
        """The same options at ``n_masks`` masks per perturbation map."""
        return dataclasses.replace(
            self,
            spes=dataclasses.replace(self.spes, n_masks=n_masks),
            encoder_spes=dataclasses.replace(self.encoder_spes, n_masks=n_masks),
        )

    @property
    def n_masks(self) -> MaskCount:
        """Masks per perturbation map (the same in both SPES families)."""
        return self.encoder_spes.n_masks

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name (what ``comparison.json`` and messages show)."""
        out: dict[str, Any] = {}
        for name in FAMILIES:
            out.update(dataclasses.asdict(self.family(name)))
        out["frame_rate"] = self.frame_rate
        return out


def flat_names() -> list[str]:
    """Every flat option name.

    >>> "p_h" in flat_names() and "frame_rate" in flat_names()
    True
    """
    names = {f.name for family in FAMILIES.values() for f in fields(family)}
    return sorted(names | {"frame_rate"})


#: what a monitor reading and ``xattn-lightning compare`` use where ``explain`` defaults differ: the mask
#: count chosen once from a first reading at 256 masks, as the smallest multiple of 256 up to 2,048 whose
#: maps reach a split-half reliability of 0.5 (:func:`xattn_lightning.functional.choose_n_masks`), then
#: fixed, so that every reading gets a corrected headline and readings stay comparable
READING_N_MASKS: MaskCount = "auto"
