"""What an adapter hands over: an utterance taken out of a batch (:class:`Utterance`), one teacher-forced
pass's output (:class:`ForwardOutput`), a model's static facts (:class:`AdapterInfo`), and the check every
adapter makes on input features (:func:`check_features`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError


@dataclass
class Utterance:
    """One utterance taken out of a batch.

    Attributes:
        features: ``[T, F]`` features in canonical layout, padding included where the model
            needs a fixed window (Whisper's 30 s).
        num_frames: valid (unpadded) input frames; saliency is computed over ``features[:num_frames]``.
        index: position in the batch.
    """

    features: Tensor
    num_frames: int
    index: int = 0


@dataclass
class ForwardOutput:
    """What one teacher-forced pass returns."""

    logits: Tensor  # [B, S, V]
    cross_attention: Tensor | None = None  # [B, L, H, S, T'] (full encoder length)
    encoder_out: Tensor | None = None  # [B, T', D]


@dataclass
class AdapterInfo:
    """Static facts about a model, read from the model."""

    num_layers: int
    num_heads: int
    num_mel_bins: int
    decoder_start_id: int
    eos_id: int
    special_ids: frozenset[int] = field(default_factory=frozenset)
    max_target_positions: int | None = None
    fixed_num_frames: int | None = None  # Whisper: every input is padded to this many frames
    vocab_size: int | None = None  # token ids are below it (labels are told from other integers by it)


def check_features(x: Tensor, what: str = "input features") -> None:
    """Reject NaN/inf features with a message that says what to do."""
    if not torch.is_floating_point(x):
        raise XAttnError(f"Expected floating-point {what} but got dtype {x.dtype}.")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise XAttnError(
            f"The {what} contain {bad} NaN/inf values; clean the audio or the feature extraction "
            "(e.g. silent segments fed to a log without a floor) before explaining."
        )
