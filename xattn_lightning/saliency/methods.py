"""The saliency methods' bodies, one call each over what every method of an utterance shares
(:class:`MethodInputs`) and the options object of the method's family; :mod:`~xattn_lightning.saliency.registry`
names them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.adapters import Adapter
from xattn_lightning.errors import XAttnError
from xattn_lightning.saliency.batching import prepared
from xattn_lightning.saliency.gradients import GRADIENT_METHODS, attribute, token_logprob_fn
from xattn_lightning.saliency.options import EncoderSpesOptions, GradientOptions, SpesOptions
from xattn_lightning.saliency.perturbation import MaskState, spes_encoder, spes_input
from xattn_lightning.saliency.result import SaliencyResult
from xattn_lightning.saliency.vocabulary import resolve_vocabulary, with_bf16_vocabulary


@dataclass
class MethodInputs:
    """What every method of one utterance shares (built once by :func:`compute_saliency`)."""

    adapter: Adapter
    feats: Tensor
    n_frames: int
    enc: Tensor | None  # the encoder output, where the adapter gives it
    t_enc: int
    dec_in: Tensor
    predicted: Tensor
    positions: Tensor
    logp_ref: Tensor
    frame_rate: float  # input frames per second
    bar: Any
    resume: dict[str, MaskState] = field(default_factory=dict)  # method -> where its masks stopped


@torch.no_grad()
def spes(method: str, x: MethodInputs, options: SpesOptions) -> SaliencyResult:
    """Input-space SPES of one utterance (:func:`~xattn_lightning.saliency.perturbation.spes_input`)."""
    adapter, dec_in, bar = x.adapter, x.dec_in, x.bar
    x_in = x.feats.to(adapter.device, adapter.dtype)
    run, lp_ref, bs = prepared(
        "spes",
        lambda f: adapter.forward(f, dec_in, output_attentions=False).logits,
        lambda b: x_in.unsqueeze(0).expand(b, -1, -1),
        x.logp_ref,
        torch.device(adapter.device),
        options,
        options.batch_size,
    )
    o = options
    return spes_input(
        run, x_in, x.n_frames, lp_ref, x.positions,
        n_masks=int(o.n_masks), p=o.p, scales=o.scales, batch_size=bs, seed=o.seed, frame_rate=x.frame_rate,
        compactness=o.compactness, sigma=o.sigma, sampling=o.sampling, max_seconds=o.max_seconds,
        progress=bar.update if bar else None, resume=x.resume.get(method),
    )  # fmt: skip


@torch.no_grad()
def encoder_spes(method: str, x: MethodInputs, options: EncoderSpesOptions) -> SaliencyResult:
    """Encoder-output SPES of one utterance (:func:`~xattn_lightning.saliency.perturbation.spes_encoder`)."""
    adapter, bar = x.adapter, x.bar
    device = torch.device(adapter.device)
    ones = torch.ones(1, x.t_enc, dtype=torch.bool, device=device)
    # the masked passes project only the explained positions onto the vocabulary: logits [B, P, V]
    explained = x.positions.to(device)
    if x.enc is None:
        raise XAttnError(f"{type(adapter).__name__} gave no encoder output for {method!r}.")
    # a causal decoder: the positions after the last explained one change nothing there, so they are not run
    dec_in = x.dec_in[..., : int(explained.max()) + 1] if explained.numel() else x.dec_in
    masked: Callable[[Tensor], Any] = adapter.masked_decoder(x.enc, dec_in, positions=explained)
    vocabulary = resolve_vocabulary(options.vocabulary, adapter, options.autocast)
    if vocabulary == "bf16":  # the vocabulary term in bfloat16, the mass-carrying tokens exact
        masked = with_bf16_vocabulary(adapter, masked, x.logp_ref[explained])
    run, lp_ref, bs = prepared(
        "encoder_spes", masked, lambda b: ones.expand(b, -1), x.logp_ref[explained], device, options,
        options.encoder_batch_size,
    )  # fmt: skip
    o = options
    result = spes_encoder(
        run, x.t_enc, lp_ref, None,  # run and lp_ref hold the explained positions only
        n_masks=int(o.n_masks), p_h=o.p_h, batch_size=bs, seed=o.seed, sampling=o.sampling,
        max_seconds=o.max_seconds, smoothing=o.smoothing,
        progress=bar.update if bar else None, resume=x.resume.get(method),
    )  # fmt: skip
    result.details["vocabulary"] = vocabulary  # the term taken ("auto" resolved)
    return result


def gradient(method: str, x: MethodInputs, options: GradientOptions) -> SaliencyResult:
    """A gradient map of one utterance (Captum's attributions, or the batched engine)."""
    adapter, feats, n_frames, enc, t_enc = x.adapter, x.feats, x.n_frames, x.enc, x.t_enc
    dec_in, predicted, positions, bar = x.dec_in, x.predicted, x.positions, x.bar
    start = time.perf_counter()
    encoder_space = method.startswith("encoder_")  # the registry's "encoder" space
    name = method.removeprefix("encoder_")
    assert name in GRADIENT_METHODS
    with torch.enable_grad():
        logits_fn: Callable[[Tensor], Tensor]
        if encoder_space:
            if enc is None:
                raise XAttnError(f"{type(adapter).__name__} gave no encoder output for {method!r}.")
            base = enc.detach().clone()

            def encoder_logits(h_valid: Tensor) -> Tensor:
                rest = base[:, t_enc:].expand(h_valid.shape[0], -1, -1)
                return adapter.decode(torch.cat([h_valid, rest], 1), dec_in).logits

            logits_fn, point = encoder_logits, base[:, :t_enc].clone().requires_grad_()
        else:
            full = feats.to(adapter.device, adapter.dtype).unsqueeze(0)

            def input_logits(x_valid: Tensor) -> Tensor:
                rest = full[:, n_frames:].expand(x_valid.shape[0], -1, -1)
                return adapter.forward(torch.cat([x_valid, rest], 1), dec_in, output_attentions=False).logits

            logits_fn, point = input_logits, full[:, :n_frames].clone().requires_grad_()
        fn = token_logprob_fn(logits_fn, predicted, positions)
        # the batched engine's vmap'd VJPs pay off on GPUs and for decoder-only graphs; on CPU a backward per
        # token through the encoder is faster (benchmarks/perf.py)
        vjp = "vmap" if encoder_space or point.device.type == "cuda" else "loop"
        attr = attribute(name, fn, point, int(positions.numel()), options, bar.update if bar else None, vjp)
    attr = attr.float()
    sm = attr.norm(dim=-1) if encoder_space else attr.abs()
    return SaliencyResult(sm.cpu(), time.perf_counter() - start)
