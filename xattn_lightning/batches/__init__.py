"""Training-script batches read by what they hold, in the dict convention the adapters take (pure: no model,
no Lightning).

Training scripts hand their batches around in many shapes: Hugging Face dicts, ``(features, labels)``
tuples, openai-whisper's ``(mel, y_in, y_out)``, ``(BatchFeature, BatchEncoding)`` pairs, dicts with
their own key names, ESPnet's ``speech``/``text`` dicts, fairseq's ``net_input``, dataclasses,
SpeechBrain's ``PaddedBatch``. :func:`standard_batch` looks at every tensor of the batch (nested one
level: a dict, tuple, dataclass or object inside the batch) and decides by what each *is*, given the
model's :class:`InputSpec`:

- the **features**: the one floating-point tensor shaped as the model's input (Whisper's
  ``[B, n_mels, 3000]``, a Speech2Text filterbank ``[B, T, F]``, NeMo's waveforms ``[B, samples]``);
- the **labels**: an integer tensor ``[B, S]`` whose real tokens are within the vocabulary (padding:
  any negative value, or a pad id after the end of text); of two such tensors where one is the other
  shifted by one token (a decoder input and its labels), the shifted one, compared on real tokens only;
- the **lengths** of the features (``[B]``, absolute or relative), made into the attention mask or the
  length entry the model takes; ids, reference texts and true word timings by their names.

Names only break ties (:data:`FEATURE_KEYS`, :data:`LABEL_KEYS`). Where two candidates remain, the error
lists them with the exact line to write: ``batch_keys={"input_features": "path.to.features", ...}``
(dotted paths into the batch, :func:`select_keys`), which a YAML config can hold, or ``batch_fn=``
(a callable, or its dotted import path :func:`resolve_batch_fn`).
"""

from __future__ import annotations

from xattn_lightning.batches.layout import (
    FEATURE_KEYS,
    ID_KEYS,
    IGNORE_INDEX,
    LABEL_KEYS,
    TEXT_KEYS,
    WORDS_KEY,
    InputSpec,
    Leaf,
    leaves,
)
from xattn_lightning.batches.paths import fix_lines, resolve_batch_fn, select_keys
from xattn_lightning.batches.standard import shifted_labels, standard_batch

__all__ = [
    "FEATURE_KEYS",
    "ID_KEYS",
    "IGNORE_INDEX",
    "LABEL_KEYS",
    "TEXT_KEYS",
    "WORDS_KEY",
    "InputSpec",
    "Leaf",
    "fix_lines",
    "leaves",
    "resolve_batch_fn",
    "select_keys",
    "shifted_labels",
    "standard_batch",
]
