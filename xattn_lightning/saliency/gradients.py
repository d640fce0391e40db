"""Gradient saliency through Captum: Saliency, InputXGradient, IntegratedGradients.

Target = log-probability of each explained token under teacher forcing. Input-space maps are
``|attribution|`` over the valid ``[T, F]`` spectrogram; encoder-space maps attribute the encoder
output H (what Captum's ``Layer*`` variants on the encoder compute) and reduce the hidden size
with the L2 norm, giving ``[I, T']``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


def _captum(name: str, fn: Callable[[Tensor], Tensor]):
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    return {
        "saliency": Saliency,
        "input_x_gradient": InputXGradient,
        "integrated_gradients": IntegratedGradients,
    }[name](fn)


def captum_attribute(
    name: str,
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    num_tokens: int,
    n_steps: int = 16,
    internal_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Attribute ``fn(x [1, ...]) -> [1, I]`` (log-prob per token) to ``x`` once per token with Captum.

    Returns ``[I, *x.shape[1:]]`` raw attributions (sign kept).
    """
    algo = _captum(name, fn)
    maps = []
    for i in range(num_tokens):
        kw: dict = {"target": i}
        if name == "saliency":
            kw["abs"] = False
        if name == "integrated_gradients":
            kw.update(
                n_steps=n_steps,
                internal_batch_size=internal_batch_size or n_steps,
                baselines=torch.zeros_like(x),
            )
        a = algo.attribute(x, **kw)
        maps.append(a[0].detach())
        if progress is not None:
            progress(1)
    return torch.stack(maps)


def token_logprob_fn(
    logits_fn: Callable[[Tensor], Tensor], predicted: Tensor, positions: Tensor
) -> Callable[[Tensor], Tensor]:
    """Wrap ``logits_fn(x) -> [B, S, V]`` into ``x -> [B, I]`` log-probs of the explained tokens."""

    def fn(x: Tensor) -> Tensor:
        lp = logits_fn(x).float().log_softmax(-1)[:, positions]
        tok = predicted[positions].to(lp.device)
        return lp.gather(-1, tok.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)

    return fn
