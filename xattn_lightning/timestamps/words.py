"""``xl.word_timestamps``: word times of a model's transcripts, by DTW over a head set chosen once per model
(:mod:`~xattn_lightning.timestamps.choice`) or named, with the duration prior and the input's silences
(the timing itself: :mod:`~xattn_lightning.timestamps.align`). Stands without Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import explain
from xattn_lightning.functional.alignment import DURATION_PRIOR, Word, select_heads_by_agreement
from xattn_lightning.timestamps.align import (
    DEFAULT_TIMING_METHOD,
    FUSION_WEIGHT,
    HEAD_RULES,
    TIMING_METHODS,
    HeadRule,
    TimingMethod,
    TimingOptions,
    alignment_from,
    alignment_words,
    ensemble_words,
)

#: masks of the encoder-output saliency behind :func:`word_timestamps`' ``heads="agreement"``: on the 13 held-out
#: timed-en utterances (tiny.en, 3 seeds) 64 masks gave 57.2 ms mean error at 1.1 s per utterance on a 2-core CPU,
#: 256 gave 56.4 ms at 2.6 s (the seeds spread over 5 ms), before the duration prior; docs/timestamps.md
TIMESTAMP_N_MASKS = 64


def word_timestamps(
    model: nn.Module | Adapter,
    batch: Any,
    *,
    tokenizer: object | None = None,
    heads: Sequence[Sequence[int]] | HeadRule | None = None,
    weights: Sequence[float] | None = None,
    fusion: float | None = None,
    targets: str | Tensor | Sequence = "generate",
    method: TimingMethod = DEFAULT_TIMING_METHOD,
    saliency_method: str = "encoder_spes",
    subframe: bool = False,
    duration_prior: float | None = None,
    silence: bool | None = None,
    **explain_options: Any,
) -> list[list[Word]]:
    """Words with start and end in seconds, per utterance: DTW over the ``heads``' cross-attention.

    The default (docs/timestamps.md): the model's head set chosen once without labels among every head, the
    upper half of the layers, its shipped ``alignment_heads``, the heads that follow the consensus and the average
    of the boundaries of every head and of those (:func:`ensemble_words`), by the span contrast (how much each
    word's log-probability drops when the encoder frames of the set's span for it are occluded, less how much it
    drops with the span moved 100 ms later: :func:`~xattn_lightning.timestamps.choice.choose_heads`; on the first
    :data:`~xattn_lightning.timestamps.choice.CHOICE_UTTERANCES` utterances timed, then cached per model, in memory
    and on disk: :func:`~xattn_lightning.timestamps.choice.heads_cache_file`), a duration prior from each token's spelling added to the DTW matrix, and word boundaries next to
    a silence of the input moved to its edges. It needs one pass per utterance and no saliency.

    Args:
        model: a supported model or adapter.
        batch: the model's inputs (e.g. :func:`xattn_lightning.loading.features_batch`) or a training batch in any
            layout. Whisper's processor cuts audio to its 30-s window: for longer audio, use
            :func:`~xattn_lightning.timestamps.audio.audio_word_timestamps`.
        tokenizer: a tokenizer or processor (word timestamps need token strings).
        targets: ``"generate"`` (the model's own transcript), ``"labels"`` or token ids.
        heads: ``None`` or ``"auto"`` (default): the model's head set, chosen once and cached
            (:func:`~xattn_lightning.timestamps.choice.choose_heads`); ``"all"``: every head averaged;
            ``"upper_half"``: every head of the upper half of the layers; ``"consistent"``: the heads nearest the
            consensus on the choosing speech; ``"all+consistent"``: the mean of the boundaries of every head and of
            the consistent heads (:func:`ensemble_words`); ``[layer, head]`` pairs (e.g. from
            :func:`alignment_heads`); ``"model"``: the model's ``generation_config.alignment_heads``;
            ``"agreement"``: per utterance, the heads whose agreement with ``saliency_method``'s map is
            at least the mean of all heads', with that map fused into the DTW matrix (``fusion``; costs
            a saliency computation per utterance).
        weights: one weight per head (e.g. their agreement), for a weighted mean.
        fusion: weight of the saliency map added to the DTW matrix; default :data:`FUSION_WEIGHT`
            with ``heads="agreement"``, else 0 (no saliency is computed then).
        method: ``"openai"`` (default; openai-whisper's convention) or ``"transformers"`` (equal to
            transformers' token timestamps; no prior, no silences); see :data:`TIMING_METHODS`.
        subframe: place each boundary inside its frame, where the two tokens' rows cross.
        duration_prior: weight of the spelling-length prior
            (:func:`~xattn_lightning.functional.alignment.with_duration_prior`); default
            :data:`~xattn_lightning.functional.alignment.DURATION_PRIOR` with ``"openai"``, 0 with
            ``"transformers"``.
        silence: move boundaries next to silent spans of the input to their edges
            (:func:`~xattn_lightning.functional.silence.snap_to_silence`); default on with
            ``"openai"``, off with ``"transformers"``.
        saliency_method: the saliency map for ``heads="agreement"`` and fusion.
        **explain_options: saliency options (``n_masks``, default :data:`TIMESTAMP_N_MASKS`; ``seed`` ...).

    Example (a real Whisper and its processor)::

        words = xl.word_timestamps(model, batch, tokenizer=processor)
        words[0][:2]  # [('The', 0.02, 0.14), ('weather', 0.14, 0.5)]
        xl.word_timestamps(model, batch, tokenizer=processor, heads="model", duration_prior=0, silence=False)
        # plain DTW over the model's own heads, as openai-whisper's transcribe(word_timestamps=True) does
    """
    adapter = adapter_for(model, tokenizer)
    if isinstance(heads, str):
        check_choice("head rule", heads, HEAD_RULES)
    heads = "auto" if heads is None else heads
    check_choice("timing method", method, TIMING_METHODS)
    refine = method == "openai"
    duration_prior = (DURATION_PRIOR if refine else 0.0) if duration_prior is None else duration_prior
    silence = refine if silence is None else silence
    if not refine and (duration_prior or silence):
        raise XAttnError("method='transformers' reproduces transformers' timestamps: it takes no duration_prior or silence.")
    if fusion is None:
        fusion = FUSION_WEIGHT if heads == "agreement" else 0.0
    timing = TimingOptions(method, fusion, subframe, duration_prior, silence)
    if heads == "model":
        heads = adapter.alignment_heads()
        if heads is None:
            raise XAttnError(f"{type(adapter.model).__name__} has no alignment heads of its own; pass heads=.")
    use_saliency = heads == "agreement" or bool(fusion)
    methods = (saliency_method,) if use_saliency else ()
    options = {"n_masks": TIMESTAMP_N_MASKS, **explain_options} if use_saliency else explain_options
    if heads in ("auto", "consistent", "all+consistent") and "encoder_cache" not in options:
        from xattn_lightning.timestamps.choice import choosing_encoder_cache  # looked up at call time

        options["encoder_cache"] = choosing_encoder_cache(adapter)  # while choosing: the occlusions reuse them
    exps = explain(adapter, batch, targets=targets, methods=methods, **options)
    aligns = [alignment_from(e, saliency_method=methods[0] if methods else None) for e in exps]
    fixed: Any = heads
    ensemble: list[list[list[int]]] = []  # the chosen candidate's head sets, when it averages several
    if aligns and heads in ("auto", "consistent", "all+consistent"):
        from xattn_lightning.timestamps.choice import candidate_sets, choose_for  # looked up at call time

        def features() -> list[Tensor]:  # only while the choice is being made: after it, no work per call
            utts = adapter.utterances(adapter.model_batch(batch))
            return [utts[e.index].features for e in exps]

        choice = choose_for(adapter, aligns, features)
        sets = choice.head_sets if heads == "auto" else candidate_sets(choice.candidates)[heads]
        if len(sets) > 1:
            if weights is not None:
                name = choice.name if heads == "auto" else heads
                raise XAttnError(f"weights= needs one head set; {name!r} averages several: pass heads=.")
            ensemble = sets
        fixed = sets[0]
    elif aligns and heads in ("all", "upper_half"):
        num_layers, num_heads = aligns[0].cross_attention.shape[:2]
        first = num_layers // 2 if heads == "upper_half" else 0
        fixed = [[li, h] for li in range(first, num_layers) for h in range(num_heads)]
    out = []
    for e, a in zip(exps, aligns):
        if ensemble:
            out.append(ensemble_words(a, ensemble, timing=timing))
            continue
        chosen = select_heads_by_agreement(e.agreement_grid(saliency_method)) if heads == "agreement" else fixed
        out.append(alignment_words(a, chosen, weights, timing=timing))
    return out
