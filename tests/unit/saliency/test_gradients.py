"""``xattn_lightning.saliency.gradients``: the batched engine against Captum, token by token."""

import pytest
import torch
from helpers import ORACLE_REGIONS, SALIENCY_METHODS, Oracle, oracle_adapter, tiny_whisper, whisper_batch

import xattn_lightning as xl


def test_captum_per_token_equals_manual_gradient():
    model = Oracle(ORACLE_REGIONS)
    x = torch.randn(1, 24, 4) + 1
    (e,) = xl.explain(oracle_adapter(model), {"input_features": x}, targets=[[1, 5, 6, 7, 2]], methods=("saliency",))
    xx = x.clone().requires_grad_()
    lp = model(xx, torch.tensor([[1, 5, 6, 7]])).log_softmax(-1)[0, 1, 6]
    (g,) = torch.autograd.grad(lp, xx)
    assert torch.allclose(e.saliency["saliency"][1], g[0].abs(), atol=1e-6)


GRADIENT_ALL = SALIENCY_METHODS[2:]  # the gradient methods, input and encoder space


@pytest.mark.parametrize("which", ["whisper", "custom"])
def test_batched_gradients_equal_captum_per_token(which):
    """One shared forward + batched backward gives Captum's maps (within 1e-4 of the largest value)."""
    if which == "whisper":
        model = tiny_whisper()
        batch, targets = whisper_batch(model, (50,)), [[51, 52, 5, 6, 7, 8, 50]]
    else:
        from xattn_lightning.testing import TinyS2T

        model = TinyS2T.adapter(TinyS2T(vocab_size=12))
        batch, targets = {"input_features": torch.randn(1, 32, 8)}, [[1, 5, 6, 7, 8, 2]]
    kw = dict(targets=targets, methods=GRADIENT_ALL, n_steps=6)
    (fast,) = xl.explain(model, batch, gradient_engine="batched", **kw)
    (ref,) = xl.explain(model, batch, gradient_engine="captum", **kw)
    for m in GRADIENT_ALL:
        a, b = fast.saliency[m], ref.saliency[m]
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-4 * max(float(b.abs().max()), 1e-12), m
    (chunked,) = xl.explain(model, batch, gradient_engine="batched", internal_batch_size=4, **kw)
    assert torch.allclose(
        chunked.saliency["integrated_gradients"],
        ref.saliency["integrated_gradients"],
        rtol=1e-4,
        atol=1e-4 * float(ref.saliency["integrated_gradients"].abs().max()),
    )
    with pytest.raises(xl.UnknownNameError, match="captum"):
        xl.explain(model, batch, gradient_engine="jax", **kw)


@pytest.mark.parametrize("name", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_batched_vjp_modes_agree_with_captum(name):
    from xattn_lightning.saliency.gradients import attribute, token_logprob_fn
    from xattn_lightning.saliency.options import GradientOptions

    model = Oracle(ORACLE_REGIONS)
    ids = torch.tensor([1, 5, 6, 7, 2])
    fn = token_logprob_fn(lambda x: model(x, ids[:-1].unsqueeze(0).expand(x.shape[0], -1)), ids[1:], torch.arange(3))
    x = torch.randn(1, 24, 4) + 1
    ref = attribute(name, fn, x.clone().requires_grad_(), 3, GradientOptions(n_steps=5, gradient_engine="captum"))
    for vjp in ("vmap", "loop"):
        got = attribute(name, fn, x, 3, GradientOptions(n_steps=5), vjp=vjp)
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-4), vjp
