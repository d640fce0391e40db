"""Gradient saliency through Captum: Saliency, InputXGradient, IntegratedGradients.

Target = log-probability of each explained token under teacher forcing. Input-space maps are
``|attribution|`` over the valid ``[T, F]`` spectrogram; encoder-space maps attribute the encoder
output H (what Captum's ``Layer*`` variants on the encoder compute) and reduce the hidden size
with the L2 norm, giving ``[I, T']``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.errors import check_choice
from xattn_lightning.saliency.options import GradientOptions

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


#: the gradient engines' options when none are given (a frozen object: shared safely)
GRADIENT_DEFAULTS = GradientOptions()


def _captum(name: str, fn: Callable[[Tensor], Tensor]):
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    return {
        "saliency": Saliency,
        "input_x_gradient": InputXGradient,
        "integrated_gradients": IntegratedGradients,
    }[name](fn)


def attribute(
    name: str,
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    num_tokens: int,
    options: GradientOptions = GRADIENT_DEFAULTS,
    progress: Callable[[int], None] | None = None,
    vjp: str = "vmap",
) -> Tensor:
    """Attribute ``fn(x [1, ...]) -> [1, I]`` (log-prob per token) to ``x`` with the gradient method ``name``
    (one of :data:`GRADIENT_METHODS`; integrated gradients: ``options.n_steps`` steps, ``options.internal_batch_size``
    at a time) and the engine ``options.gradient_engine``: ``"batched"`` (one shared forward and batched
    backward passes, ``vjp`` ``"vmap"`` or ``"loop"``) or ``"captum"`` (Captum's forward and
    backward per token). ``progress`` is called with the number of tokens done.

    Returns ``[I, *x.shape[1:]]`` raw attributions (sign kept).

    Example:
        >>> x = torch.ones(1, 3)
        >>> attribute("input_x_gradient", lambda v: 2 * v[:, :2], x, 2).tolist()
        [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    """
    check_choice("gradient method", name, GRADIENT_METHODS)
    check_choice("vjp", vjp, ("vmap", "loop"))
    if options.gradient_engine == "captum":
        return _captum_attribute(_captum(name, fn), name, x, num_tokens, options, progress)
    out = _batched_attribute(name, fn, x.detach(), num_tokens, options, vjp)
    if progress is not None:
        progress(num_tokens)
    return out


def _captum_attribute(
    algo: Any, name: str, x: Tensor, num_tokens: int, options: GradientOptions, progress: Callable[[int], None] | None
) -> Tensor:
    """Captum's ``algo`` (made for ``name``) run once per token: ``[I, *x.shape[1:]]``."""
    maps = []
    for i in range(num_tokens):
        kw: dict = {"target": i}
        if name == "saliency":
            kw["abs"] = False
        if name == "integrated_gradients":
            kw.update(
                n_steps=options.n_steps,
                internal_batch_size=options.internal_batch_size or options.n_steps,
                baselines=torch.zeros_like(x),
            )
        a = algo.attribute(x, **kw)
        maps.append(a[0].detach())
        if progress is not None:
            progress(1)
    return torch.stack(maps)


def _vjp_rows(y: Tensor, x: Tensor, vjp: str = "vmap") -> Tensor:
    """Gradients of every column of ``y [B, I]`` (summed over B) w.r.t. ``x``: ``[I, *x.shape]``.

    ``vjp="vmap"``: one batched vector-Jacobian product (``is_grads_batched``, vmap over the
    backward; falls back to the loop when the model's backward cannot be vmapped). ``"loop"``: one
    backward per token over the shared graph, which is faster on CPU when the graph runs through a
    large encoder (measured on Whisper tiny.en: 1.6x vs Captum for the loop, 1.2x for vmap).
    """
    n = y.shape[1]
    if vjp == "vmap":
        eye = torch.eye(n, dtype=y.dtype, device=y.device).unsqueeze(1).expand(n, y.shape[0], n)
        try:
            (g,) = torch.autograd.grad(y, x, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            return g
        except (RuntimeError, NotImplementedError):
            pass
    rows = []
    for i in range(n):
        (gi,) = torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < n - 1)
        rows.append(gi)
    return torch.stack(rows)


def _batched_attribute(
    name: str, fn: Callable[[Tensor], Tensor], x: Tensor, num_tokens: int, options: GradientOptions, vjp: str
) -> Tensor:
    """Captum's Saliency / InputXGradient / IntegratedGradients (Gauss-Legendre, zero baseline) for
    all ``num_tokens`` targets of ``fn`` at the detached ``x`` from one shared forward pass (per chunk of IG
    steps) and batched backward passes, instead of Captum's forward + backward per target. Same maps as
    Captum's (tested to 1e-4); returns ``[I, *x.shape[1:]]``.
    """
    if name in ("saliency", "input_x_gradient"):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        g = _vjp_rows(y, xi, vjp)[:, 0]
        out = g if name == "saliency" else g * x[0]
        return out.detach()
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes_fn, alphas_fn = approximation_parameters("gausslegendre")
    n_steps = options.n_steps
    weights = torch.tensor(step_sizes_fn(n_steps), dtype=x.dtype, device=x.device)
    alphas = torch.tensor(alphas_fn(n_steps), dtype=x.dtype, device=x.device)
    baseline = torch.zeros_like(x)
    chunk = options.internal_batch_size or n_steps
    total = torch.zeros(num_tokens, *x.shape[1:], dtype=x.dtype, device=x.device)
    for s0 in range(0, n_steps, chunk):
        a = alphas[s0 : s0 + chunk].view(-1, *([1] * (x.dim() - 1)))
        xs = (baseline + a * (x - baseline)).requires_grad_()
        y = fn(xs)  # [steps, I]
        g = _vjp_rows(y, xs, vjp)  # [I, steps, ...] (each row: d y[:, i] / d xs)
        w = weights[s0 : s0 + chunk].view(1, -1, *([1] * (x.dim() - 1)))
        total += (g * w).sum(1)
    return (total * (x - baseline)[0]).detach()


def token_logprob_fn(
    logits_fn: Callable[[Tensor], Tensor], predicted: Tensor, positions: Tensor
) -> Callable[[Tensor], Tensor]:
    """Wrap ``logits_fn(x) -> [B, S, V]`` into ``x -> [B, I]`` log-probs of the explained tokens."""

    def fn(x: Tensor) -> Tensor:
        lp = logits_fn(x).float().log_softmax(-1)[:, positions]
        tok = predicted[positions].to(lp.device)
        return lp.gather(-1, tok.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)

    return fn
