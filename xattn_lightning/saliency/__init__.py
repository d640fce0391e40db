"""Saliency methods and their registry; ``compute_saliency`` fills an :class:`~xattn_lightning.Explanation`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from xattn_lightning.adapters import Adapter, ForwardOutput, Utterance
from xattn_lightning.errors import UnknownNameError, XAttnError
from xattn_lightning.functional.pooling import check_smoothing
from xattn_lightning.saliency.gradients import (
    GRADIENT_METHODS,
    batched_attribute,
    captum_attribute,
    token_logprob_fn,
)
from xattn_lightning.saliency.options import (
    SAMPLINGS,
    EncoderSpesOptions,
    SpesOptions,
    as_kwargs,
    default_options,
    options_for,
)
from xattn_lightning.saliency.perturbation import rows_batch_size, spes_encoder, spes_input

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


@dataclass
class _Inputs:
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
    opts: dict
    bar: Any


class MethodSpec(NamedTuple):
    """A saliency method: where its map lives, what it is, its family and how to compute it.

    Indexing keeps the old ``(space, description)`` tuple reading: ``METHODS[m][0]`` is the space.
    """

    space: Literal["input", "encoder"]
    description: str
    family: Literal["perturbation", "gradient"]
    compute: Callable[[str, _Inputs], tuple[Tensor, dict]]


def perturbation_methods(methods: Sequence[str]) -> list[str]:
    """The perturbation (mask-based) methods among ``methods``.

    >>> perturbation_methods(["saliency", "encoder_spes"])
    ['encoder_spes']
    """
    return [m for m in methods if METHODS[m].family == "perturbation"]


#: option name -> default; the same names are accepted by explain(), the monitor and the CLI (the
#: defaults live in the typed option families of :mod:`xattn_lightning.saliency.options`)
OPTIONS: dict[str, Any] = default_options()

#: the batch size that ``batch_size="auto"`` uses off CUDA (``encoder_batch_size="auto"`` off CUDA:
#: :func:`~xattn_lightning.saliency.perturbation.rows_batch_size`)
CPU_BATCH_SIZES: dict[str, int] = {"spes": 8}
#: the share of free GPU memory that ``"auto"`` batch sizes may fill, and their upper bound
AUTO_MEMORY_SHARE = 0.6
AUTO_MAX_BATCH = 1024
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "METHODS",
    "OPTIONS",
    "MethodName",
    "MethodSpec",
    "compute_saliency",
    "list_methods",
    "perturbation_methods",
    "validate_methods",
]


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


def _autocast(device: torch.device, name: str | None) -> Any:
    """``torch.autocast`` for the perturbed passes (``None``: full precision)."""
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[name])


def auto_batch_size(run_batch: Callable[[int], Any], n_masks: int, device: torch.device, cpu_default: int) -> int:
    """A mask batch size that fits the free GPU memory.

    Measures the peak memory of one perturbed pass at batch 1 and at batch 4, and takes as many masks
    per batch as :data:`AUTO_MEMORY_SHARE` of the free memory holds (at most ``n_masks`` and
    :data:`AUTO_MAX_BATCH`). Off CUDA it returns ``cpu_default`` (batching barely helps on CPU).

    >>> auto_batch_size(lambda b: None, 100, torch.device("cpu"), 8)
    8
    """
    if device.type != "cuda":
        return max(1, min(cpu_default, n_masks))
    peaks = []
    for b in (1, 4):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            run_batch(b)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_mask = max((peaks[1] - peaks[0]) / 3.0, peaks[0] / 4.0, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(n_masks, AUTO_MAX_BATCH, (AUTO_MEMORY_SHARE * free) // per_mask)))


def compute_saliency(
    adapter: Adapter,
    u: Utterance,
    exp: Any,
    methods: Sequence[str],
    progress: bool = False,
    reference: ForwardOutput | None = None,
    **options: Any,
) -> None:
    """Compute ``methods`` for one utterance and store them in ``exp.saliency`` / ``exp.info``.

    ``reference`` is the unperturbed teacher-forced pass (logits and encoder output) when the caller
    has it already, so that the encoder does not run again."""
    opts = {**OPTIONS, **options}
    seq = exp.decoder_ids
    dec_in = seq[:-1]
    predicted = seq[1:]
    positions = (~adapter.special_mask(predicted)).nonzero().view(-1).to(adapter.device)
    feats = u.features.clone()  # leaves inference-mode tensors behind
    n_frames = u.num_frames
    t_enc = exp.num_encoder_frames
    bar = _progress_bar(progress, methods, opts, positions.numel())
    try:
        ref = reference
        if ref is None or ref.encoder_out is None:
            with torch.no_grad():
                ref = adapter.forward(feats.unsqueeze(0), dec_in, output_attentions=False)
        logp_ref = ref.logits[0].float().log_softmax(-1)
        enc = ref.encoder_out
        inputs = _Inputs(adapter, feats, n_frames, enc, t_enc, dec_in, predicted, positions, logp_ref, opts, bar)
        for m in methods:
            sm, info = METHODS[m].compute(m, inputs)
            if not torch.isfinite(sm).all():
                raise XAttnError(f"Saliency {m!r} produced NaN/inf values for utterance {u.index}.")
            exp.saliency[m] = sm
            exp.info[m] = info
    finally:
        if bar is not None:
            bar.close()


def _prepared(
    method: str,
    run: Callable[[Tensor], Tensor],
    unmasked: Callable[[int], Tensor],
    logp_ref: Tensor,
    device,
    opts: dict,
) -> tuple[Callable[[Tensor], Tensor], Tensor, int]:
    """What both perturbation families share: the perturbed pass in the asked precision, its
    unperturbed reference and the mask batch size (``"auto"`` resolved)."""

    def cast_run(x: Tensor) -> Tensor:
        with _autocast(device, opts["autocast"]):
            return run(x).float()

    # under autocast the unperturbed reference is taken in the same precision, so that the KL of an
    # unmasked pass stays zero
    lp_ref = cast_run(unmasked(1))[0].log_softmax(-1) if opts["autocast"] else logp_ref
    bs = opts["encoder_batch_size" if method == "encoder_spes" else "batch_size"]
    if bs == "auto":
        cpu = rows_batch_size(lp_ref.shape[0], opts["n_masks"]) if method == "encoder_spes" else CPU_BATCH_SIZES[method]
        bs = auto_batch_size(lambda b: cast_run(unmasked(b)), opts["n_masks"], device, cpu)
    return cast_run, lp_ref, bs


@torch.no_grad()
def _spes(method: str, x: _Inputs) -> tuple[Tensor, dict]:
    adapter, dec_in, opts, bar = x.adapter, x.dec_in, x.opts, x.bar
    x_in = x.feats.to(adapter.device, adapter.dtype)
    run, lp_ref, bs = _prepared(
        "spes",
        lambda f: adapter.forward(f, dec_in, output_attentions=False).logits,
        lambda b: x_in.unsqueeze(0).expand(b, -1, -1),
        x.logp_ref,
        torch.device(adapter.device),
        opts,
    )
    return spes_input(
        run,
        x_in,
        x.n_frames,
        lp_ref,
        x.positions,
        **{
            **as_kwargs(options_for(SpesOptions, opts), "autocast"),
            "batch_size": bs,
            "frame_rate": opts.get("frame_rate") or adapter.frame_rate,
        },
        progress=bar.update if bar else None,
    )


@torch.no_grad()
def _encoder_spes(method: str, x: _Inputs) -> tuple[Tensor, dict]:
    adapter, opts, bar = x.adapter, x.opts, x.bar
    device = torch.device(adapter.device)
    ones = torch.ones(1, x.t_enc, dtype=torch.bool, device=device)
    # the masked passes project only the explained positions onto the vocabulary: logits [B, P, V]
    explained = x.positions.to(device)
    if x.enc is None:
        raise XAttnError(f"{type(adapter).__name__} gave no encoder output for {method!r}.")
    masked = adapter.masked_decoder(x.enc, x.dec_in, positions=explained)
    run, lp_ref, bs = _prepared(
        "encoder_spes", masked, lambda b: ones.expand(b, -1), x.logp_ref[explained], device, opts
    )
    return spes_encoder(
        run,
        x.t_enc,
        lp_ref,
        None,  # run and lp_ref hold the explained positions only
        **{**as_kwargs(options_for(EncoderSpesOptions, opts), "autocast", "encoder_batch_size"), "batch_size": bs},
        progress=bar.update if bar else None,
    )


def _progress_bar(enabled: bool, methods: Sequence[str], opts: dict, num_tokens: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = 0
    for m in methods:
        total += opts["n_masks"] if METHODS[m].family == "perturbation" else num_tokens
    return tqdm(total=total, desc="saliency", unit="pass", leave=False)


def _gradient(method: str, x: _Inputs) -> tuple[Tensor, dict]:
    adapter, feats, n_frames, enc, t_enc = x.adapter, x.feats, x.n_frames, x.enc, x.t_enc
    dec_in, predicted, positions, opts, bar = x.dec_in, x.predicted, x.positions, x.opts, x.bar
    import time

    start = time.perf_counter()
    encoder_space = METHODS[method].space == "encoder"
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
        engine: Callable[..., Tensor]
        if opts["gradient_engine"] == "batched":
            # vmap'd VJPs pay off on GPUs and for decoder-only graphs; on CPU a backward per token
            # through the encoder is faster (benchmarks/perf.py)
            vjp = "vmap" if encoder_space or point.device.type == "cuda" else "loop"
            engine = functools.partial(batched_attribute, vjp=vjp)
        else:
            engine = captum_attribute
        attr = engine(
            name,
            fn,
            point,
            int(positions.numel()),
            n_steps=opts["n_steps"],
            internal_batch_size=opts["internal_batch_size"],
            progress=bar.update if bar else None,
        )
    attr = attr.float()
    sm = attr.norm(dim=-1) if encoder_space else attr.abs()
    return sm.cpu(), {"seconds": time.perf_counter() - start}


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
