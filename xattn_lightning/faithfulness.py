"""Deletion / insertion faithfulness (paper §3.3): remove the most relevant input cells by an
explanation's ranking, re-decode, and watch the error rate.

Protocol (SPES' ``deletion_insertion_dataset.py``): the explanation is averaged over the token axis
into one relevance map per utterance over the valid ``T × F`` spectrogram (encoder-resolution maps,
attention included, are broadcast back over each encoder step's input frames and every bin); cells
are ranked by relevance; for every fraction ``p`` the top-``p`` cells are set to 0 (deletion) or
only the top-``p`` are kept and the rest set to 0 (insertion); the utterance is re-decoded and the
error rate against a reference is clipped at 100; the score is the normalised area under the
curve. Deletion: higher = more faithful. Insertion: lower = more faithful.

Stands without Lightning; knows models only through an :class:`~xattn_lightning.Adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, Utterance, adapter_for
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import Explanation, grad_allowed
from xattn_lightning.functional import deletion_auc
from xattn_lightning.functional.pooling import broadcast_to_input
from xattn_lightning.text import edit_distance, normalize_text

#: 0, 5, ..., 100 % (the paper's steps)
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 20 for i in range(21))
MODES = ("deletion", "insertion")


@dataclass
class FaithfulnessCurve:
    """Error rate (clipped at 100) of the re-decoded output against the fraction of cells removed."""

    explainer: str
    mode: str
    fractions: list[float]
    scores: list[float]
    hypotheses: list[str] = field(default_factory=list)

    @property
    def auc(self) -> float:
        """Normalised area under the curve, in [0, 100]."""
        return deletion_auc(self.fractions, self.scores)


def relevance_map(exp: Explanation, explainer: str, **aggregation: Any) -> Tensor:
    """One relevance map ``[T, F]`` over the valid spectrogram, mean over the explained tokens.

    ``explainer`` is ``"attention"`` (aggregated cross-attention; ``layers``/``heads``/``pairs`` as
    keyword arguments), a saliency method name at its native resolution (``"spes"`` → ``T × F``,
    encoder-space methods broadcast from ``T'``), or ``"<method>:pooled"`` (pooled to ``T'`` first,
    i.e. the resolution cross-attention has).

    >>> from xattn_lightning.explain import Explanation
    >>> e = Explanation(torch.tensor([5]), None, torch.tensor([[[[0.75, 0.25]]]]), 2, torch.zeros(4, 3),
    ...                 torch.zeros(1), torch.tensor([1, 5, 2]))
    >>> relevance_map(e, "attention")[:, 0].tolist()
    [0.75, 0.75, 0.25, 0.25]
    """
    t, f = exp.features.shape
    if explainer == "attention":
        enc = exp.attention(**aggregation)
    else:
        method, _, res = explainer.partition(":")
        check_choice("explainer resolution", res or "native", ("native", "pooled"))
        if res == "pooled":
            enc = exp.pooled(method)
        else:
            sm = exp.saliency_map(method)
            if sm.dim() == 3:
                return sm.float().mean(0)
            enc = sm
    return broadcast_to_input(enc.float().mean(0, keepdim=True), exp.frames_per_step, t, f)[0]


def _rank(relevance: Tensor) -> Tensor:
    """Flat cell indices, most relevant first (stable: ties keep time order)."""
    return torch.argsort(relevance.reshape(-1), descending=True, stable=True)


def perturbed_features(features: Tensor, num_frames: int, order: Tensor, fraction: float, mode: str) -> Tensor:
    """``features`` with the top-``fraction`` of ranked valid cells zeroed (deletion) or only them
    kept (insertion); padding beyond ``num_frames`` is never touched.

    >>> x = torch.ones(3, 2)
    >>> perturbed_features(x, 2, torch.tensor([3, 0, 1, 2]), 0.5, "deletion").tolist()
    [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    check_choice("faithfulness mode", mode, MODES)
    n_cells = order.numel()
    k = int(round(fraction * n_cells))
    valid = features[:num_frames].reshape(-1).clone()
    keep = torch.ones(n_cells, dtype=torch.bool)
    keep[order[:k]] = False
    if mode == "insertion":
        keep = ~keep
    valid = valid * keep.to(valid.dtype)
    out = features.clone()
    out[:num_frames] = valid.view(num_frames, -1)
    return out


def error_rate(reference: Sequence | str, hypothesis: Sequence | str, max_score: float = 100.0) -> float:
    """Word error rate (strings, light normaliser) or token error rate (id sequences), in percent,
    clipped at ``max_score``.

    >>> round(error_rate("a b c", "a x c"), 2)
    33.33
    >>> error_rate([1, 2], [3, 4, 5, 6, 7])
    100.0
    """
    if isinstance(reference, str):
        reference, hypothesis = normalize_text(reference), normalize_text(str(hypothesis))
    ref, hyp = list(reference), list(hypothesis)
    if not ref:
        return 0.0 if not hyp else max_score
    return min(max_score, 100.0 * edit_distance(ref, hyp) / len(ref))


def faithfulness_curves(
    model: nn.Module | Adapter,
    batch: Mapping[str, Any],
    explanations: Sequence[Explanation],
    explainers: Sequence[str] = ("attention",),
    modes: Sequence[str] = ("deletion",),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    references: Sequence[str | Sequence[int]] | None = None,
    tokenizer: object | None = None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = False,
    **aggregation: Any,
) -> list[dict[str, FaithfulnessCurve]]:
    """Deletion/insertion curves for every utterance of ``batch`` and every explainer.

    Args:
        model: the model (or adapter) that produced ``explanations`` from ``batch``.
        explanations: ``xl.explain(model, batch, ...)`` output for the same batch.
        explainers: ``"attention"``, saliency method names, or ``"<method>:pooled"``
            (see :func:`relevance_map`).
        modes: ``"deletion"`` and/or ``"insertion"``.
        fractions: increasing fractions of valid cells in [0, 1] (default 0, 5, ..., 100 %).
        batch: the model inputs the explanations were made from.
        tokenizer: a tokenizer or processor, to score re-decoded text by WER.
        progress: show a progress bar.
        references: per utterance, the reference text (scored by WER) or token ids (token error
            rate). Default: the explained output itself, so the curve starts at 0.
        num_beams: re-decoding beam size (the paper used beam search; greedy is the cheap default).
        max_new_tokens: re-decoding length limit (default twice the reference length + 8, so a
            perturbed input that makes the model ramble cannot stall the run).
        **aggregation: ``layers``/``heads``/``pairs`` for the ``"attention"`` explainer.

    Returns:
        One dict per utterance: ``"<explainer>/<mode>"`` → :class:`FaithfulnessCurve`.

    Example:
        >>> import xattn_lightning as xl
        >>> from xattn_lightning.testing import TinyS2T
        >>> m = TinyS2T(vocab_size=12)
        >>> b = {"input_features": torch.randn(1, 16, 8)}
        >>> exps = xl.explain(TinyS2T.adapter(m), b, targets=[[1, 5, 6, 2]])
        >>> c = faithfulness_curves(TinyS2T.adapter(m), b, exps, fractions=(0.0, 1.0))
        >>> sorted(c[0])
        ['attention/deletion']
    """
    for m in modes:
        check_choice("faithfulness mode", m, MODES)
    fr = [float(x) for x in fractions]
    if len(fr) < 2 or any(not 0.0 <= x <= 1.0 for x in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise XAttnError(f"Expected at least two strictly increasing fractions in [0, 1] but got {fr}.")
    adapter = adapter_for(model, tokenizer)
    if references is not None and len(references) != len(explanations):
        raise XAttnError(f"Got {len(references)} references for {len(explanations)} explanations.")
    total = len(explanations) * len(explainers) * len(modes) * len(fr)
    bar = _bar(progress, total)
    results: list[dict[str, FaithfulnessCurve]] = []
    try:
        with grad_allowed(), torch.no_grad(), adapter.capture_context():
            utts = {u.index: u for u in adapter.utterances(batch)}
            for n, exp in enumerate(explanations):
                if exp.index not in utts:
                    raise XAttnError(f"Explanation of utterance {exp.index} has no utterance in this batch.")
                u = utts[exp.index]
                if u.num_frames != exp.num_frames:
                    raise XAttnError(
                        f"Utterance {exp.index} has {u.num_frames} valid frames but its explanation "
                        f"{exp.num_frames}; pass the batch the explanations were computed from."
                    )
                ref = references[n] if references is not None else _own_output(adapter, exp)
                ref_len = len(normalize_text(ref)) if isinstance(ref, str) else len(ref)
                max_new = max_new_tokens or 2 * max(int(exp.token_ids.numel()), ref_len) + 8
                curves: dict[str, FaithfulnessCurve] = {}
                for explainer in explainers:
                    order = _rank(relevance_map(exp, explainer, **aggregation))
                    for mode in modes:
                        scores, hyps = [], []
                        for f in fr:
                            feats = perturbed_features(u.features, u.num_frames, order, f, mode)
                            seq = adapter.generate(Utterance(feats, u.num_frames, u.index), num_beams, max_new)
                            hyp = _output(adapter, seq, text=isinstance(ref, str))
                            scores.append(error_rate(ref, hyp))
                            hyps.append(hyp if isinstance(hyp, str) else " ".join(map(str, hyp)))
                            if bar is not None:
                                bar.update(1)
                        curves[f"{explainer}/{mode}"] = FaithfulnessCurve(explainer, mode, fr, scores, hyps)
                results.append(curves)
    finally:
        if bar is not None:
            bar.close()
    return results


def _output(adapter: Adapter, seq: Tensor, text: bool) -> str | list[int]:
    ids = seq[1:]
    ids = ids[~adapter.special_mask(ids)]
    if text:
        decoded = adapter.decode_text(ids)
        if decoded is None:
            raise XAttnError("Text references need a tokenizer; pass tokenizer=... or token-id references.")
        return decoded
    return ids.tolist()


def _own_output(adapter: Adapter, exp: Explanation) -> str | list[int]:
    if exp.text is not None:
        return exp.text
    return exp.token_ids.tolist()


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="faithfulness", unit="decode", leave=False)


def mean_auc(curves: Sequence[Mapping[str, FaithfulnessCurve]], key: str) -> float:
    """Mean AUC of curve ``key`` (``"<explainer>/<mode>"``) over utterances.

    >>> mean_auc([], "attention/deletion")
    nan
    """
    vals = [c[key].auc for c in curves if key in c]
    return float(sum(vals) / len(vals)) if vals else math.nan
