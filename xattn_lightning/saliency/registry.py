"""The saliency methods by name: where each map lives, what it is, its family, how to compute it; and the
checks of method and option names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.functional.pooling import check_smoothing
from xattn_lightning.saliency.batching import AUTOCAST_DTYPES
from xattn_lightning.saliency.methods import MethodInputs, _encoder_spes, _gradient, _spes
from xattn_lightning.saliency.options import SAMPLINGS, VOCABULARIES, default_options
from xattn_lightning.saliency.result import SaliencyResult

MethodName = Literal[
    "spes",
    "encoder_spes",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "encoder_saliency",
    "encoder_input_x_gradient",
    "encoder_integrated_gradients",
]


class MethodSpec(NamedTuple):
    """A saliency method: where its map lives, what it is, its family and how to compute it.

    Indexing keeps the old ``(space, description)`` tuple reading: ``METHODS[m][0]`` is the space.
    """

    space: Literal["input", "encoder"]
    description: str
    family: Literal["perturbation", "gradient"]
    compute: Callable[[str, MethodInputs], SaliencyResult]


def perturbation_methods(methods: Sequence[str]) -> list[str]:
    """The perturbation (mask-based) methods among ``methods``.

    >>> perturbation_methods(["saliency", "encoder_spes"])
    ['encoder_spes']
    """
    return [m for m in methods if METHODS[m].family == "perturbation"]


#: option name -> default; the same names are accepted by explain(), the monitor and the CLI (the
#: defaults live in the typed option families of :mod:`xattn_lightning.saliency.options`)
OPTIONS: dict[str, Any] = default_options()


def list_methods() -> list[str]:
    """Names of the saliency methods.

    >>> "spes" in list_methods()
    True
    """
    return sorted(METHODS)


def validate_methods(methods: Sequence[str], options: dict[str, Any]) -> None:
    """Raise on unknown method or option names (listing the valid ones)."""
    if isinstance(methods, str):
        raise XAttnError(f"Expected a sequence of method names but got the string {methods!r}; use ({methods!r},).")
    for m in methods:
        if m not in METHODS:
            raise UnknownNameError("saliency method", m, METHODS)
    for k in options:
        if k not in OPTIONS:
            raise UnknownNameError("option", k, OPTIONS)
    if options.get("sampling", "plain") not in SAMPLINGS:
        raise UnknownNameError("sampling", options["sampling"], SAMPLINGS)
    if options.get("vocabulary", "exact") not in VOCABULARIES:
        raise UnknownNameError("vocabulary", options["vocabulary"], VOCABULARIES)
    if options.get("gradient_engine", "batched") not in ("batched", "captum"):
        raise UnknownNameError("gradient_engine", options["gradient_engine"], ("batched", "captum"))
    if options.get("autocast") is not None and options["autocast"] not in AUTOCAST_DTYPES:
        raise UnknownNameError("autocast", options["autocast"], AUTOCAST_DTYPES)
    check_smoothing(options.get("smoothing", 0))
    n = options.get("n_masks", 1)
    if n != "auto" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise XAttnError(f"Expected n_masks to be a positive int or 'auto' but got {n!r}.")
    for k in ("batch_size", "encoder_batch_size"):
        v = options.get(k, 1)
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise XAttnError(f"Expected {k} to be a positive int or 'auto' but got {v!r}.")


#: the registry: method name -> :class:`MethodSpec`; ``compute_saliency`` dispatches through it
METHODS: dict[str, MethodSpec] = {
    "spes": MethodSpec(
        "input",
        "SPES: multi-scale SLIC segments of the spectrogram zeroed at random, KL scorer (SM_X)",
        "perturbation",
        _spes,
    ),
    "encoder_spes": MethodSpec(
        "encoder", "whole encoder-output frames zeroed at random, KL scorer (SM_H)", "perturbation", _encoder_spes
    ),
    "saliency": MethodSpec("input", "Captum Saliency |d log p / d X|", "gradient", _gradient),
    "input_x_gradient": MethodSpec("input", "Captum InputXGradient |X * d log p / d X|", "gradient", _gradient),
    "integrated_gradients": MethodSpec(
        "input", "Captum IntegratedGradients from an all-zero spectrogram, |attribution|", "gradient", _gradient
    ),
    "encoder_saliency": MethodSpec(
        "encoder", "Captum Saliency on the encoder output, L2 over hidden size", "gradient", _gradient
    ),
    "encoder_input_x_gradient": MethodSpec(
        "encoder", "Captum InputXGradient on the encoder output, L2 over hidden size", "gradient", _gradient
    ),
    "encoder_integrated_gradients": MethodSpec(
        "encoder", "Captum IntegratedGradients on the encoder output, L2 over hidden size", "gradient", _gradient
    ),
}
