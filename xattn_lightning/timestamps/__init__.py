"""Word timestamps from cross-attention: ``word_timestamps`` (:mod:`.words`; of audio of any length:
``audio_word_timestamps``, :mod:`.audio`), timing (:mod:`.align`), which
heads (:mod:`.heads`; the default's set, chosen once per model: :mod:`.choice`), the alignment loss of fine-tunes
(:mod:`.loss`) and caption files (:mod:`.captions`). The DTW, prior and silence maths are pure functions in
:mod:`xattn_lightning.functional.alignment` and :mod:`xattn_lightning.functional.silence`. Stands without Lightning.

>>> from xattn_lightning.timestamps import word_timestamps, alignment_heads, choose_heads, AlignmentLoss, captions
"""

from xattn_lightning.timestamps import captions
from xattn_lightning.timestamps.align import (
    DEFAULT_TIMING_METHOD,
    FUSION_WEIGHT,
    HEAD_RULES,
    PLAIN_TIMING,
    TIMING_METHODS,
    Alignment,
    HeadRule,
    TimingOptions,
    align,
    alignment_from,
    alignment_token_times,
    alignment_words,
    ensemble_words,
    score_probes,
    timing_scores,
)
from xattn_lightning.timestamps.audio import SILENT_PEAK, AudioWords, audio_word_timestamps
from xattn_lightning.timestamps.choice import (
    CHOICE_TOLERANCE_SE,
    CHOICE_UTTERANCES,
    ENSEMBLES,
    HEAD_SETS,
    HeadChoice,
    cached_heads,
    candidate_heads,
    candidate_sets,
    choose_heads,
    choose_heads_from,
    consistent_heads,
    forget_heads,
    heads_cache_file,
    heads_report,
)
from xattn_lightning.timestamps.heads import (
    alignment_heads,
    head_agreement,
    head_errors,
    model_alignment_heads,
    select_heads_supervised,
)
from xattn_lightning.timestamps.loss import EOS_SECONDS, AlignmentLoss
from xattn_lightning.timestamps.occlusion import (
    CHOICE_DURATION_PRIOR,
    CHOICE_LATER_SECONDS,
    CHOICE_MAX_WORDS,
    span_contrast,
    span_drops,
    span_occluder,
)
from xattn_lightning.timestamps.words import TIMESTAMP_N_MASKS, word_timestamps

__all__ = [
    "SILENT_PEAK",
    "AudioWords",
    "audio_word_timestamps",
    "CHOICE_DURATION_PRIOR",
    "CHOICE_LATER_SECONDS",
    "CHOICE_MAX_WORDS",
    "CHOICE_TOLERANCE_SE",
    "CHOICE_UTTERANCES",
    "DEFAULT_TIMING_METHOD",
    "HEAD_RULES",
    "ENSEMBLES",
    "HEAD_SETS",
    "HeadChoice",
    "HeadRule",
    "cached_heads",
    "candidate_heads",
    "candidate_sets",
    "choose_heads",
    "choose_heads_from",
    "consistent_heads",
    "forget_heads",
    "heads_cache_file",
    "heads_report",
    "span_contrast",
    "span_drops",
    "span_occluder",
    "EOS_SECONDS",
    "FUSION_WEIGHT",
    "TIMESTAMP_N_MASKS",
    "PLAIN_TIMING",
    "TIMING_METHODS",
    "TimingOptions",
    "Alignment",
    "AlignmentLoss",
    "align",
    "alignment_from",
    "alignment_heads",
    "alignment_token_times",
    "alignment_words",
    "ensemble_words",
    "captions",
    "head_agreement",
    "head_errors",
    "model_alignment_heads",
    "score_probes",
    "select_heads_supervised",
    "timing_scores",
    "word_timestamps",
]
