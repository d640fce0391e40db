"""The saliency methods by name, each behind one small contract (:class:`MethodSpec`): where its map lives,
what it is, the family of options it takes, and ``compute(inputs, options) -> SaliencyResult``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.saliency.methods import MethodInputs, encoder_spes, gradient, spes
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
    """The contract of a saliency method: where its map lives (``space``), what it is, whether it is a
    perturbation or a gradient method, which options family of
    :class:`~xattn_lightning.saliency.options.SaliencyOptions` it takes (``options``: a field name), and
    ``compute(method, inputs, options) -> SaliencyResult`` over one utterance's shared
    :class:`~xattn_lightning.saliency.methods.MethodInputs` and that family's options object.

    >>> METHODS["encoder_spes"].options, METHODS["saliency"].family
    ('encoder_spes', 'gradient')
    """

    space: Literal["input", "encoder"]
    description: str
    family: Literal["perturbation", "gradient"]
    options: Literal["spes", "encoder_spes", "gradient"]
    compute: Callable[[str, MethodInputs, Any], SaliencyResult]


def perturbation_methods(methods: Sequence[str]) -> list[str]:
    """The perturbation (mask-based) methods among ``methods``.

    >>> perturbation_methods(["saliency", "encoder_spes"])
    ['encoder_spes']
    """
    return [m for m in methods if METHODS[m].family == "perturbation"]


def list_methods() -> list[str]:
    """Names of the saliency methods.

    >>> "spes" in list_methods()
    True
    """
    return sorted(METHODS)


def validate_methods(methods: Sequence[str]) -> None:
    """Raise on a method name that does not exist (listing the valid ones); the options are checked where
    they are made (:class:`~xattn_lightning.saliency.options.SaliencyOptions`).

    >>> validate_methods(["encoder_spes"])
    """
    if isinstance(methods, str):
        raise XAttnError(f"Expected a sequence of method names but got the string {methods!r}; use ({methods!r},).")
    for m in methods:
        if m not in METHODS:
            raise UnknownNameError("saliency method", m, METHODS)


#: the registry: method name -> :class:`MethodSpec`; ``compute_saliency`` dispatches through it
METHODS: dict[str, MethodSpec] = {
    "spes": MethodSpec(
        "input",
        "SPES: multi-scale SLIC segments of the spectrogram zeroed at random, KL scorer (SM_X)",
        "perturbation",
        "spes",
        spes,
    ),
    "encoder_spes": MethodSpec(
        "encoder", "whole encoder-output frames zeroed at random, KL scorer (SM_H)", "perturbation", "encoder_spes",
        encoder_spes,
    ),
    "saliency": MethodSpec("input", "Captum Saliency |d log p / d X|", "gradient", "gradient", gradient),
    "input_x_gradient": MethodSpec("input", "Captum InputXGradient |X * d log p / d X|", "gradient", "gradient", gradient),
    "integrated_gradients": MethodSpec(
        "input", "Captum IntegratedGradients from an all-zero spectrogram, |attribution|", "gradient", "gradient", gradient
    ),
    "encoder_saliency": MethodSpec(
        "encoder", "Captum Saliency on the encoder output, L2 over hidden size", "gradient", "gradient", gradient
    ),
    "encoder_input_x_gradient": MethodSpec(
        "encoder", "Captum InputXGradient on the encoder output, L2 over hidden size", "gradient", "gradient", gradient
    ),
    "encoder_integrated_gradients": MethodSpec(
        "encoder", "Captum IntegratedGradients on the encoder output, L2 over hidden size", "gradient", "gradient", gradient
    ),
}
