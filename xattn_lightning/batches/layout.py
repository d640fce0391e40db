"""A batch's layout: the key names of common training scripts (tie-breakers), what a model takes
(:class:`InputSpec`) and a batch's values with where they sit (:class:`Leaf`, :func:`leaves`). Pure: no model,
no Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: keys that hold the input features in the batches of common training scripts, in order of preference (a
#: tie-breaker only: the features are found by their shape)
FEATURE_KEYS: tuple[str, ...] = (
    "input_features",
    "features",
    "mel",
    "mels",
    "log_mel",
    "spectrogram",
    "audio_features",
    "speech",
    "src_tokens",  # fairseq speech-to-text: the filterbank under the name of text models' source tokens
    "input_values",
    "input_signal",
    "audio",
    "sig",
    "input_ids",  # openai-whisper notebooks: the log-mel spectrogram under this name (floating point)
    "inputs",
    "x",
)
#: keys that hold the target token ids (a tie-breaker, as :data:`FEATURE_KEYS`)
LABEL_KEYS: tuple[str, ...] = (
    "labels",
    "label",
    "label_ids",
    "targets",
    "target",
    "target_ids",
    "tokens_eos",
    "y_out",
    "y",
    "text",
    "tokens",
    "input_ids",
)
#: batch keys that hold an utterance id, a reference transcript, and true word timings
ID_KEYS: tuple[str, ...] = ("id", "ids", "utt_id", "uttid", "key", "keys")
TEXT_KEYS: tuple[str, ...] = ("text", "sentence", "transcript", "transcription", "texts", "transcripts", "wrd")
WORDS_KEY = "words"
#: the id value that marks padding in labels (the Hugging Face convention, also common with openai-whisper)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class InputSpec:
    """What a model takes, as far as finding it in a batch goes.

    Attributes:
        input_key: where the model's batch holds the features.
        feature_shape: the shape of one utterance's features (``None`` for a free dimension), e.g.
            ``(80, 3000)`` for Whisper; ``None``: any floating-point ``[B, ...]`` of rank 2 or 3.
        time_dim: the dimension of ``feature_shape`` that counts frames (or samples).
        vocab_size: the number of token ids (labels are within it), when known.
        length_key: where the model's batch holds the features' lengths ``[B]`` (NeMo); ``None``: lengths
            are given as an ``attention_mask [B, frames]``.

    Example:
        >>> InputSpec(feature_shape=(80, 3000)).describe()
        'a floating-point tensor [B, 80, 3000]'
    """

    input_key: str = "input_features"
    feature_shape: tuple[int | None, ...] | None = None
    time_dim: int = 0
    vocab_size: int | None = None
    length_key: str | None = None

    def matches(self, x: object) -> bool:
        """Whether ``x`` is a batch of features this model takes."""
        if not isinstance(x, Tensor) or not torch.is_floating_point(x) or x.dim() < 2:
            return False
        if self.feature_shape is None:
            return x.dim() in (2, 3)
        return x.dim() == len(self.feature_shape) + 1 and all(
            want is None or want == got for want, got in zip(self.feature_shape, x.shape[1:])
        )

    def describe(self) -> str:
        """The features' shape in words."""
        if self.feature_shape is None:
            return "a floating-point tensor [B, ...] of rank 2 or 3"
        dims = ", ".join(["B", *("*" if d is None else str(d) for d in self.feature_shape)])
        return f"a floating-point tensor [{dims}]"


@dataclass(frozen=True)
class Leaf:
    """One value of a batch and where it sits: ``path`` from the batch (keys, positions, attribute names)."""

    path: tuple[str | int, ...]
    value: Any

    @property
    def name(self) -> str:
        """Its name for tie-breaking: the last key (a ``PaddedData``'s ``data`` takes its parent's)."""
        names = [p for p in self.path if isinstance(p, str)]
        if len(names) >= 2 and names[-1] == "data":
            return names[-2]
        return names[-1] if names else ""

    @property
    def where(self) -> str:
        """The dotted path that :func:`select_keys` reads (``"net_input.src_tokens"``, ``"0"``)."""
        return ".".join(str(p) for p in self.path)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor[{', '.join(map(str, x.shape))}] {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (list, tuple)) and not _is_namedtuple(x):
        return f"{type(x).__name__}[{len(x)}]"
    return type(x).__name__


def _is_namedtuple(x: object) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _children(x: Any, top: bool) -> list[tuple[str | int, Any]] | None:
    """The named parts of a container (``None``: ``x`` is a value). Tuples and lists are containers at the
    top of a batch (``(features, labels)``) and as named tuples; elsewhere they are values (a list of texts)."""
    if isinstance(x, (Tensor, str, bytes)):
        return None
    if isinstance(x, Mapping):
        return [(k, v) for k, v in x.items() if isinstance(k, str)]
    if _is_namedtuple(x):
        return list(zip(x._fields, x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
    if isinstance(x, (tuple, list)):
        return list(enumerate(x)) if top and x and not all(isinstance(v, str) for v in x) else None
    attrs = getattr(x, "__dict__", None)  # an object holding its tensors as attributes (SpeechBrain's PaddedBatch)
    if isinstance(attrs, dict) and any(isinstance(v, Tensor) or _is_namedtuple(v) for v in attrs.values()):
        return [(k, v) for k, v in attrs.items() if not k.startswith("_")]
    return None


def leaves(batch: Any) -> list[Leaf]:
    """Every value of ``batch``, looking one level into the containers it holds.

    Example:
        >>> [leaf.where for leaf in leaves({"net_input": {"src_tokens": torch.zeros(1, 2)}, "target": torch.zeros(1)})]
        ['net_input.src_tokens', 'target']
    """
    out: list[Leaf] = []
    top = _children(batch, top=True)
    if top is None:
        return [Leaf((), batch)]
    for key, value in top:
        inner = _children(value, top=False)
        if inner is None:
            out.append(Leaf((key,), value))
        else:
            out.extend(Leaf((key, k), v) for k, v in inner)
    return out
