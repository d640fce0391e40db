"""The driver: all the methods asked of one utterance, over one shared reference pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from xattn_lightning.adapters import Adapter, ForwardOutput, Utterance
from xattn_lightning.errors import XAttnError
from xattn_lightning.saliency.methods import MethodInputs
from xattn_lightning.saliency.options import SaliencyOptions
from xattn_lightning.saliency.perturbation import MaskState
from xattn_lightning.saliency.registry import METHODS
from xattn_lightning.saliency.result import SaliencyResult


def compute_saliency(
    adapter: Adapter,
    u: Utterance,
    exp: Any,
    methods: Sequence[str],
    options: SaliencyOptions | None = None,
    progress: bool = False,
    reference: ForwardOutput | None = None,
    resume: Mapping[str, MaskState] | None = None,
) -> dict[str, SaliencyResult]:
    """Compute ``methods`` for one utterance: ``{method: SaliencyResult}``, each method handed its own family's
    options (:meth:`SaliencyOptions.family`; default: every default). ``exp`` (its
    :class:`~xattn_lightning.Explanation`, without saliency yet) gives the explained decoder
    sequence and the number of encoder frames; it is not changed.

    ``reference`` is the unperturbed teacher-forced pass (logits and encoder output) when the caller
    has it already, so that the encoder does not run again. ``resume`` (method -> the ``state`` of an earlier
    map of this utterance and sequence) continues those perturbation maps to ``n_masks`` instead of
    starting them again."""
    options = options or SaliencyOptions()
    seq = exp.decoder_ids
    dec_in = seq[:-1]
    predicted = seq[1:]
    positions = (~adapter.special_mask(predicted)).nonzero().view(-1).to(adapter.device)
    feats = u.features.clone()  # leaves inference-mode tensors behind
    n_frames = u.num_frames
    t_enc = exp.num_encoder_frames
    bar = _progress_bar(progress, methods, options.n_masks, positions.numel(), resume or {})
    try:
        ref = reference
        if ref is None or ref.encoder_out is None:
            with torch.no_grad():
                ref = adapter.forward(feats.unsqueeze(0), dec_in, output_attentions=False)
        logp_ref = ref.logits[0].float().log_softmax(-1)
        enc = ref.encoder_out
        frame_rate = float(options.frame_rate or adapter.frame_rate)
        inputs = MethodInputs(
            adapter, feats, n_frames, enc, t_enc, dec_in, predicted, positions, logp_ref, frame_rate, bar,
            dict(resume or {}),
        )  # fmt: skip
        results: dict[str, SaliencyResult] = {}
        for m in methods:
            spec = METHODS[m]
            results[m] = spec.compute(m, inputs, options.family(spec.options))
            if not torch.isfinite(results[m].map).all():
                raise XAttnError(f"Saliency {m!r} produced NaN/inf values for utterance {u.index}.")
        return results
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(
    enabled: bool, methods: Sequence[str], n_masks: Any, num_tokens: int, resume: Mapping[str, MaskState]
) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = 0
    for m in methods:
        total += (
            int(n_masks) - (resume[m].n if m in resume else 0) if METHODS[m].family == "perturbation" else num_tokens
        )
    return tqdm(total=total, desc="saliency", unit="pass", leave=False)
