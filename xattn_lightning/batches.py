"""Training-script batches in the dict convention the adapters read (pure; no model, no Lightning).

Training scripts hand their batches around in many shapes. :func:`standard_batch` accepts the
unambiguous ones and names the fix (``batch_fn=``) for everything else:

- a dict in the Hugging Face convention (``input_features``, ``attention_mask``, ``labels``), as it is;
- a dict with a usual alternative key for the features (:data:`FEATURE_KEYS`, e.g. ``mel`` or the
  floating-point ``input_ids`` of the common openai-whisper fine-tuning notebooks) or the labels
  (:data:`LABEL_KEYS`, e.g. ``targets``);
- a tuple or list ``(features, labels)``: floating-point features and integer labels;
- a triple ``(features, decoder_input, labels)`` as openai-whisper fine-tuning repositories make it
  (``(mel, y_in, y_out)``): the labels are the one of the two id tensors that is the other shifted
  left by one token (``y_out[:, :-1] == y_in[:, 1:]`` wherever neither is padding);
- a pair of dicts ``(BatchFeature, BatchEncoding)``, a feature extractor's output and a tokenizer's
  (``batch[0]["input_features"]``, ``batch[1]["labels"]``, or its integer ``input_ids``);
- a floating-point features tensor alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.adapters.nemo import INPUT_KEY as NEMO_INPUT_KEY
from xattn_lightning.adapters.nemo import nemo_batch
from xattn_lightning.errors import XAttnError

#: keys that hold the input features in the batches of common training scripts, in order of preference
FEATURE_KEYS: tuple[str, ...] = (
    "input_features",
    "features",
    "mel",
    "mels",
    "log_mel",
    "spectrogram",
    "audio_features",
    "input_ids",  # openai-whisper notebooks: the log-mel spectrogram under this name (floating point)
    "inputs",
    "x",
)
#: keys that hold the target token ids (HF ``labels`` convention: padding ``-100``)
LABEL_KEYS: tuple[str, ...] = ("labels", "label", "label_ids", "targets", "target", "target_ids", "y")

_HINT = (
    "pass batch_fn=... to the monitor that turns your batch into "
    "{'input_features': Tensor, 'labels': Tensor} (labels optional with targets='generate')"
)
#: the id value that marks padding in labels (the Hugging Face convention, also common with openai-whisper)
IGNORE_INDEX = -100


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor[{', '.join(map(str, x.shape))}] {str(x.dtype).removeprefix('torch.')}"
    return type(x).__name__


def _is_features(x: object) -> bool:
    return isinstance(x, Tensor) and torch.is_floating_point(x) and x.dim() in (2, 3)


def _is_labels(x: object) -> bool:
    return isinstance(x, Tensor) and not torch.is_floating_point(x) and not x.is_complex() and x.dim() in (1, 2)


def standard_batch(batch: Any, input_key: str = "input_features") -> dict[str, Any]:
    """Return ``batch`` as a dict with the features under ``input_key`` (and target ids under
    ``labels`` when the batch has them); raise :class:`~xattn_lightning.XAttnError` naming
    ``batch_fn=`` when the shape is ambiguous.

    Example:
        >>> feats, labels = torch.randn(2, 80, 3000), torch.randint(0, 9, (2, 5))
        >>> sorted(standard_batch((feats, labels)))
        ['input_features', 'labels']
        >>> sorted(standard_batch({"mel": feats, "targets": labels, "id": ["a", "b"]}))
        ['id', 'input_features', 'labels']
        >>> y_in = torch.tensor([[7, 1, 2, 3], [7, 4, 5, -100]])  # openai-whisper (mel, y_in, y_out)
        >>> y_out = torch.tensor([[1, 2, 3, 9], [4, 5, 9, -100]])
        >>> standard_batch((feats, y_in, y_out))["labels"] is y_out
        True
        >>> standard_batch((feats, labels, labels))
        Traceback (most recent call last):
        ...
        xattn_lightning.errors.XAttnError: The batch is a tuple of 3 items (...): features and two id tensors, neither ...
    """
    if isinstance(batch, Mapping):
        return _from_mapping(batch, input_key)
    if input_key == NEMO_INPUT_KEY and (nemo := nemo_batch(batch)) is not None:  # NeMo's own batches
        return nemo
    if _is_features(batch):
        return {input_key: batch}
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = list(batch)
        if len(items) == 1 and _is_features(items[0]):
            return {input_key: items[0]}
        if len(items) == 2 and _is_features(items[0]) and _is_labels(items[1]):
            feats, labels = items
            if labels.dim() == feats.dim() - 1 and (labels.dim() == 1 or labels.shape[0] == feats.shape[0]):
                return {input_key: feats, "labels": labels}
        if len(items) == 1 and isinstance(items[0], Mapping):  # a list holding one dict
            return _from_mapping(items[0], input_key)
        if len(items) == 2 and isinstance(items[0], Mapping) and isinstance(items[1], Mapping):
            return _from_two_mappings(items[0], items[1], input_key, type(batch).__name__)
        shapes = ", ".join(_describe(x) for x in items)
        what = f"The batch is a {type(batch).__name__} of {len(items)} items ({shapes})"
        if len(items) == 3 and _is_features(items[0]) and _is_labels(items[1]) and _is_labels(items[2]):
            which = _shifted_labels(items[1], items[2])
            if which is not None:
                return {input_key: items[0], "labels": items[which], "dec_input_ids": items[3 - which]}
            raise XAttnError(
                f"{what}: features and two id tensors, neither of which is the other shifted by one token (as "
                f"openai-whisper's (mel, y_in, y_out) are), so which are the labels is ambiguous. Say it with "
                f'batch_fn=lambda b: {{"input_features": b[0], "labels": b[2]}} (or b[1]).'
            )
        raise XAttnError(
            f"{what}; understood without help are (features, labels) with floating-point features [B, ...] and "
            f"integer labels [B, S], openai-whisper's (mel, decoder_input, labels) and a pair of dicts "
            f"(BatchFeature, BatchEncoding): {_HINT}."
        )
    raise XAttnError(f"The batch is a {_describe(batch)}, not a dict, a (features, labels) pair or a tensor: {_HINT}.")


def _shifted_labels(a: Tensor, b: Tensor) -> int | None:
    """``2`` when ``b`` is ``a`` shifted left by one token (``b`` are the labels), ``1`` when ``a`` is ``b``
    shifted, ``None`` when neither or both (then which is which cannot be told)."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
        return None

    def follows(x: Tensor, y: Tensor) -> bool:  # y[:, :-1] == x[:, 1:] where both are real tokens
        xs, ys = x[:, 1:], y[:, :-1]
        real = (xs != IGNORE_INDEX) & (ys != IGNORE_INDEX)
        return bool(real.any()) and bool((xs[real] == ys[real]).all())

    ab, ba = follows(a, b), follows(b, a)
    return None if ab == ba else (2 if ab else 1)


def _from_two_mappings(
    features: Mapping[str, Any], text: Mapping[str, Any], input_key: str, kind: str
) -> dict[str, Any]:
    """A feature extractor's output and a tokenizer's: the features dict, with the text dict's labels
    (its ``labels``, a usual alternative, or its integer ``input_ids``). The text dict's ``attention_mask``
    is the tokens' and is left out."""
    out = _from_mapping(features, input_key)
    if "labels" in out:
        return out
    for key in (*LABEL_KEYS, "input_ids"):
        if _is_labels(text.get(key)):
            out["labels"] = text[key]
            return out
    keys = ", ".join(f"{k}: {_describe(v)}" for k, v in text.items())
    raise XAttnError(
        f"The batch is a {kind} of two dicts; the second ({{{keys}}}) has no integer labels under "
        f"{', '.join((*LABEL_KEYS, 'input_ids'))}: {_HINT}."
    )


def _from_mapping(batch: Mapping[str, Any], input_key: str) -> dict[str, Any]:
    out = dict(batch)
    if input_key not in out:
        found = [k for k in FEATURE_KEYS if k != input_key and _is_features(out.get(k))]
        if not found:
            keys = ", ".join(f"{k}: {_describe(v)}" for k, v in out.items())
            raise XAttnError(
                f"The batch has no features under {input_key!r} nor under a usual alternative "
                f"({', '.join(FEATURE_KEYS)}); it has {{{keys}}}: {_HINT}."
            )
        out[input_key] = out.pop(found[0])
    if "labels" not in out:
        found = [k for k in LABEL_KEYS if _is_labels(out.get(k))]
        if found:
            out["labels"] = out.pop(found[0])
    return out
