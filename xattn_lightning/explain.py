"""``xl.explain``: cross-attention and saliency of an S2T model for a batch of utterances.

Stands without Lightning: the callback, the CLI and the demo call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, Utterance, adapter_for
from xattn_lightning.adapters.base import DEFAULT_FRAME_RATE, check_target_length
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.functional import (
    aggregate_attention,
    agreement_grid,
    disattenuate,
    pool_saliency,
    split_half_reliability,
)
from xattn_lightning.functional import agreement as _agreement
from xattn_lightning.functional import per_token_correlation as _per_token
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec
from xattn_lightning.functional.agreement import Metric
from xattn_lightning.functional.pooling import Pooling
from xattn_lightning.saliency.options import SaliencyOptions
from xattn_lightning.saliency.result import SaliencyResult

TARGET_MODES = ("generate", "labels")


@dataclass
class Explanation:
    """Everything explained about one utterance. Token axis ``I`` excludes special tokens.

    Attributes:
        token_ids: ``LongTensor[I]`` explained tokens.
        tokens: token strings when a tokenizer is known, else ``None``.
        cross_attention: ``Tensor[L, H, I, T']`` with padding frames removed.
        frames_per_step: input frames per encoder frame.
        frame_rate: input frames per second (the adapter's, or the ``frame_rate`` option).
        features: ``Tensor[T, F]`` valid input features (canonical time × frequency layout).
        log_probs: ``Tensor[I]`` log-probability of each explained token under teacher forcing.
        decoder_ids: the whole decoder sequence (prompt, tokens, EOS) that was forced.
        text: decoded text of the explained tokens, when a tokenizer is known.
        results: method name → its :class:`~xattn_lightning.saliency.SaliencyResult` (the map, ``[I, T, F]`` in
            input space or ``[I, T']`` in encoder space; its half maps, masks, seconds and where its masks stopped).
        positions: ``LongTensor[I]`` where each explained token sits in ``decoder_ids``.
        decoder_attention: ``Tensor[L, H, S - 1, T']`` cross-attention of every decoder input
            ``decoder_ids[:-1]`` (prompt and special tokens included): what word timestamps align.
    """

    token_ids: Tensor
    tokens: list[str] | None
    cross_attention: Tensor
    frames_per_step: int
    features: Tensor
    log_probs: Tensor
    decoder_ids: Tensor
    text: str | None = None
    index: int = 0
    results: dict[str, SaliencyResult] = field(default_factory=dict)
    positions: Tensor | None = None
    decoder_attention: Tensor | None = None
    frame_rate: float = DEFAULT_FRAME_RATE

    @property
    def saliency(self) -> dict[str, Tensor]:
        """Method name → its map (a view of :attr:`results`)."""
        return {m: r.map for m, r in self.results.items()}

    @property
    def num_frames(self) -> int:
        """Valid input frames T."""
        return int(self.features.shape[0])

    @property
    def num_encoder_frames(self) -> int:
        """Valid encoder frames T'."""
        return int(self.cross_attention.shape[-1])

    def attention(self, layers: LayerSpec = None, heads: HeadSpec = None, pairs: Sequence | None = None) -> Tensor:
        """Aggregated cross-attention ``[I, T']`` (default: mean over all layers and heads)."""
        return aggregate_attention(self.cross_attention, layers=layers, heads=heads, pairs=pairs)

    def saliency_map(self, method: str) -> Tensor:
        """The saliency map of ``method`` as computed (``[I, T, F]`` or ``[I, T']``); a clear error
        naming what was computed when it was not."""
        return self.result(method).map

    def result(self, method: str) -> SaliencyResult:
        """The :class:`~xattn_lightning.saliency.SaliencyResult` of ``method``; a clear error naming what was
        computed when it was not."""
        if method not in self.results:
            raise XAttnError(
                f"No saliency {method!r} in this explanation; computed: {sorted(self.results) or 'none'}. "
                f"Pass methods=({method!r},) to explain()."
            )
        return self.results[method]

    def pooled(self, method: str, mode: Pooling = "max2d") -> Tensor:
        """Saliency of ``method`` at encoder resolution ``[I, T']`` (input-space maps are pooled)."""
        sm = self.saliency_map(method)
        if sm.dim() == 2:
            return sm
        return pool_saliency(sm, self.frames_per_step, self.num_encoder_frames, mode=mode)

    def agreement(
        self,
        method: str,
        layers: LayerSpec = None,
        heads: HeadSpec = None,
        pairs: Sequence | None = None,
        metric: Metric = "pearson",
        pooling: Pooling = "max2d",
        normalize: bool = True,
        corrected: bool = False,
    ) -> float:
        """Paper-faithful agreement ρ(CA, SM) of this utterance (default Pearson, all layers and heads).

        ``corrected=True`` divides by the square root of the saliency map's split-half
        :meth:`reliability` (Spearman's correction for attenuation): an estimate of the agreement
        with the map an unlimited number of masks would give. Deterministic maps are unchanged.
        """
        rho = _agreement(self.attention(layers, heads, pairs), self.pooled(method, pooling), metric, normalize)
        if not corrected:
            return rho
        return disattenuate(rho, self.reliability(method, metric, pooling))

    def pooled_halves(self, method: str, pooling: Pooling = "max2d") -> Tensor | None:
        """The two half maps of a perturbation method (even and odd masks) at encoder resolution,
        ``[2, I, T']``; ``None`` for exact (gradient) maps."""
        halves = self.result(method).halves
        if halves is None:
            return None
        if halves.dim() == 4:  # input space [2, I, T, F]
            halves = torch.stack(
                [pool_saliency(h, self.frames_per_step, self.num_encoder_frames, mode=pooling) for h in halves]
            )
        return halves

    def reliability(self, method: str, metric: Metric = "pearson", pooling: Pooling = "max2d") -> float:
        """Split-half reliability of a perturbation map at encoder resolution (1.0 for gradient
        maps, which are exact); see :func:`xattn_lightning.functional.split_half_reliability`."""
        halves = self.pooled_halves(method, pooling)
        if halves is None:
            return 1.0
        return split_half_reliability(halves[0], halves[1], metric)

    def mask_noise(
        self,
        method: str,
        metric: Metric = "pearson",
        pooling: Pooling = "max2d",
        layers: LayerSpec = None,
        heads: HeadSpec = None,
    ) -> float:
        """Standard deviation of :meth:`agreement` due to the random masks, from the two half maps:
        their agreements differ by about twice the full map's (0.0 for exact maps)."""
        halves = self.pooled_halves(method, pooling)
        if halves is None:
            return 0.0
        ca = self.attention(layers, heads)
        a, b = (_agreement(ca, h, metric) for h in halves)
        return abs(a - b) / 2.0

    def per_token_agreement(
        self, method: str, metric: Metric = "pearson", pooling: Pooling = "max2d", **agg: Any
    ) -> Tensor:
        """ρ per explained token, ``[I]``."""
        return _per_token(self.attention(**agg), self.pooled(method, pooling), metric)

    def agreement_grid(self, method: str, metric: Metric = "pearson", pooling: Pooling = "max2d") -> Tensor:
        """ρ of every single (layer, head), ``[L, H]``."""
        return agreement_grid(self.cross_attention, self.pooled(method, pooling), metric)

    def layer_agreement(self, method: str, metric: Metric = "pearson", pooling: Pooling = "max2d") -> Tensor:
        """ρ of each layer's head-mean attention, ``[L]``."""
        sm = self.pooled(method, pooling)
        return torch.tensor(
            [_agreement(self.attention(layers=li), sm, metric) for li in range(self.cross_attention.shape[0])],
            dtype=torch.float64,
        )

    def context_mixing_gap(
        self, metric: Metric = "pearson", input_method: str = "spes", encoder_method: str = "encoder_spes"
    ) -> float:
        """ρ(CA, SM_H) − ρ(CA, SM_X): how much closer attention is to encoder-output saliency."""
        return self.agreement(encoder_method, metric=metric) - self.agreement(input_method, metric=metric)


@contextlib.contextmanager
def grad_allowed() -> Iterator[None]:
    """Leave any ``torch.inference_mode`` / ``no_grad`` of the caller (Lightning validation)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _targets_for(
    adapter: Adapter, batch: Mapping[str, Any], utts: list[Utterance], targets: str | Tensor | Sequence
) -> list[Tensor | None]:
    """Target sequences per utterance; ``None`` where the model's own hypothesis is to be generated."""
    if isinstance(targets, str):
        check_choice("targets mode", targets, TARGET_MODES)
        if targets == "generate":
            return [None] * len(utts)
        if "labels" not in batch:
            raise XAttnError(
                f"targets='labels' needs a 'labels' entry in the batch (keys: {sorted(batch)}); "
                "pass target ids with targets=... or use targets='generate'."
            )
        targets = batch["labels"]
    if isinstance(targets, Tensor):
        rows = [targets] if targets.dim() == 1 and len(utts) == 1 else list(targets)
    else:
        rows = list(targets)
        if rows and isinstance(rows[0], int):
            rows = [rows]
    if len(rows) != len(utts):
        raise XAttnError(f"Got {len(rows)} target sequences for {len(utts)} utterances.")
    return [adapter.normalize_target(torch.as_tensor(r)) for r in rows]


def explain(
    model: nn.Module | Adapter,
    batch: Any,
    targets: str | Tensor | Sequence = "generate",
    methods: Sequence[str] = (),
    tokenizer: object | None = None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = False,
    encoder_cache: EncoderCache | None = None,
    resume: Sequence[Explanation | None] | None = None,
    options: SaliencyOptions | None = None,
    **method_options: Any,
) -> list[Explanation]:
    """Explain every utterance of ``batch``: cross-attention, and the saliency ``methods``.

    Args:
        model: a supported model (HF Whisper / Speech2Text) or an :class:`~xattn_lightning.Adapter`.
        batch: the model's own input dict (e.g. ``WhisperProcessor(..., return_attention_mask=True)``), or a
            training script's batch in any layout the monitor reads (tuples, other key names, NeMo's
            mini-batch: :func:`xattn_lightning.batches.standard_batch`).
        targets: ``"generate"`` (the model's own hypothesis, greedy or ``num_beams``), ``"labels"``
            (``batch["labels"]``), or target ids (one sequence per utterance).
        methods: saliency methods (see :func:`xattn_lightning.list_methods`).
        tokenizer: a tokenizer or processor, for token strings and text.
        num_beams: beam size of ``targets="generate"`` (1: greedy).
        max_new_tokens: length limit of the generated hypothesis.
        progress: show a progress bar over the saliency passes.
        encoder_cache: an :class:`~xattn_lightning.encoder_cache.EncoderCache` to reuse encoder outputs
            across calls while the encoder's weights do not change (e.g. a frozen encoder).
        resume: one earlier explanation (or ``None``) per utterance, of the same model and options with
            fewer masks: its tokens are explained again and its perturbation maps continue to ``n_masks``,
            only the masks they lack drawn (from where their seeded stream stopped), instead of all
            ``n_masks`` from the start. With the default ``encoder_spes`` options the result is the map of
            one call at ``n_masks`` up to float rounding.
        options: the saliency options as one object (:class:`~xattn_lightning.saliency.SaliencyOptions`), or
        **method_options: the same as flat keywords: ``n_masks``, ``seed``, ``p``, ``p_h``, ``batch_size``,
            ``n_steps``, ... each going to every method that takes it. ``max_seconds`` caps each perturbation
            method per utterance: masks stop at the budget (whole batches) and ``e.results[method].n_masks`` says
            how many ran.

    Example:
        >>> import xattn_lightning as xl
        >>> from xattn_lightning.testing import TinyS2T
        >>> exps = xl.explain(TinyS2T.adapter(TinyS2T(vocab_size=12)), {"input_features": torch.randn(1, 16, 8)},
        ...                   targets=[[1, 5, 6, 2]])
        >>> exps[0].cross_attention.shape
        torch.Size([2, 2, 2, 4])
    """
    from xattn_lightning.saliency import compute_saliency, perturbation_methods, validate_methods

    validate_methods(methods)
    if options is not None and method_options:
        raise XAttnError(f"Pass options= or flat options ({', '.join(sorted(method_options))}), not both.")
    options = options if options is not None else SaliencyOptions.from_flat(**method_options)
    if options.n_masks == "auto" and (perturbation_methods(methods) or "n_masks" in method_options):
        raise XAttnError(
            "n_masks='auto' is chosen from a first reading by the monitor and by compare; xl.explain needs a "
            "number, e.g. n_masks=512 (xl.functional.choose_n_masks gives it from a reliability measured at fewer)."
        )
    methods = tuple(methods)
    adapter = adapter_for(model, tokenizer)
    batch = adapter.model_batch(batch)
    results: list[Explanation] = []
    with grad_allowed(), adapter.capture_context():
        utts = adapter.utterances(batch)
        seqs = _targets_for(adapter, batch, utts, targets)
        earlier = _resumed(resume, len(utts))
        for u, seq, before in zip(utts, seqs, earlier):
            if before is not None:  # the tokens the earlier maps explain
                seq = before.decoder_ids
            exp, ref = _explain_one(adapter, u, seq, num_beams, max_new_tokens, encoder_cache)
            exp.frame_rate = float(options.frame_rate or adapter.frame_rate)
            if methods:
                done = before.results if before is not None else {}
                states = {m: r.state for m, r in done.items() if r.state is not None}
                exp.results = compute_saliency(
                    adapter, u, exp, methods, options, progress=progress, reference=ref, resume=states
                )
            results.append(exp)
    return results


def _resumed(resume: Sequence[Explanation | None] | None, n: int) -> list[Explanation | None]:
    """``resume`` checked against the ``n`` utterances: one earlier explanation or ``None`` each."""
    if resume is None:
        return [None] * n
    if isinstance(resume, Explanation):
        resume = [resume]
    if len(resume) != n:
        raise XAttnError(f"Got {len(resume)} explanations to resume for {n} utterances.")
    return list(resume)


def _encode_once(adapter: Adapter, u: Utterance, cache: EncoderCache | None = None) -> Tensor | None:
    """The utterance's encoder output, computed once and shared by decoding, attention capture and
    the saliency reference, or taken from ``cache`` (``None`` for adapters without separate encoder
    and decoder passes)."""
    if not adapter.split_passes:
        return None
    features = u.features.unsqueeze(0)
    return adapter.encode(features) if cache is None else cache.encode(adapter, features)


@torch.no_grad()
def _explain_one(
    adapter: Adapter,
    u: Utterance,
    seq: Tensor | None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    encoder_cache: EncoderCache | None = None,
) -> tuple[Explanation, Any]:
    enc = _encode_once(adapter, u, encoder_cache)
    if seq is None:
        seq = adapter.generate(u, num_beams=num_beams, max_new_tokens=max_new_tokens, encoder_out=enc)
    check_target_length(adapter, seq)
    predicted = seq[1:]
    keep = ~adapter.special_mask(predicted)
    if not bool(keep.any()):
        raise XAttnError(
            f"Utterance {u.index}: the target has only special tokens ({predicted.tolist()}), nothing to explain; "
            "the model produced no text (check the audio) or the labels are empty."
        )
    if enc is not None:
        out = adapter.decode(enc, seq[:-1], output_attentions=True)
    else:
        out = adapter.forward(u.features.unsqueeze(0), seq[:-1], output_attentions=True)
    fps = adapter.frames_per_step(u)
    if out.cross_attention is None:  # every adapter returns it when asked (output_attentions=True)
        raise XAttnError(f"{type(adapter).__name__} returned no cross-attention although it was asked for.")
    t_enc = min(adapter.encoder_length(u.num_frames), out.cross_attention.shape[-1])
    ca = out.cross_attention[0, :, :, :, :t_enc].float()
    logp = out.logits[0].float().log_softmax(-1)
    lp = logp.gather(-1, predicted.to(logp.device).unsqueeze(-1)).squeeze(-1)
    keep_d = keep.to(ca.device)
    token_ids = predicted[keep]
    if not torch.isfinite(ca).all():
        raise XAttnError(
            f"Utterance {u.index}: the model produced NaN/inf cross-attention; check its weights and dtype."
        )
    return Explanation(
        token_ids=token_ids,
        tokens=adapter.token_strings(token_ids),
        cross_attention=ca[:, :, keep_d].cpu(),
        frames_per_step=fps,
        features=u.features[: u.num_frames].float().cpu(),
        log_probs=lp[keep_d].cpu(),
        decoder_ids=seq.cpu(),
        text=adapter.decode_text(seq[1:]),
        index=u.index,
        positions=keep.nonzero().view(-1) + 1,
        decoder_attention=ca.cpu(),
    ), out


def corpus_agreement(explanations: Sequence[Explanation], method: str, **kwargs: Any) -> float:
    """Corpus score: mean of per-utterance ρ (utterances with an undefined ρ are left out; ``nan`` if all are).

    >>> corpus_agreement([], "spes")
    nan
    """
    vals = torch.tensor([e.agreement(method, **kwargs) for e in explanations], dtype=torch.float64)
    return float(vals.nanmean())
