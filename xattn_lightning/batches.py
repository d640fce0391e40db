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

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.errors import XAttnError

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


def select_keys(batch: Any, batch_keys: Mapping[str, str]) -> dict[str, Any]:
    """The model's batch from the dotted paths ``batch_keys`` (model key -> where it sits in ``batch``):
    dict keys, tuple positions and attribute names, e.g. ``{"input_features": "net_input.src_tokens",
    "labels": "target"}`` or ``{"input_features": "0", "labels": "2"}``.

    Example:
        >>> b = ({"feats": torch.ones(1, 2)}, torch.tensor([[3, 4]]))
        >>> sorted(select_keys(b, {"input_features": "0.feats", "labels": "1"}))
        ['input_features', 'labels']
    """
    out: dict[str, Any] = {}
    for key, path in batch_keys.items():
        x = batch
        for part in str(path).split("."):
            try:
                if isinstance(x, Mapping):
                    x = x[part]
                elif isinstance(x, (tuple, list)) and part.lstrip("-").isdigit():
                    x = x[int(part)]
                else:
                    x = getattr(x, part)
            except (KeyError, IndexError, AttributeError):
                have = ", ".join(leaf.where for leaf in leaves(batch))
                raise XAttnError(
                    f"batch_keys: {key!r} -> {path!r}: the batch has nothing at {part!r}; its values sit at: {have}."
                ) from None
        out[key] = x
    return out


def resolve_batch_fn(batch_fn: Callable[[Any], Any] | str | None) -> Callable[[Any], Any] | None:
    """``batch_fn`` as a callable: a callable as it is, or its import path (``"my_pkg.data:to_batch"`` or
    ``"my_pkg.data.to_batch"``), which a YAML config can hold.

    Example:
        >>> resolve_batch_fn("os.path:basename")("a/b")
        'b'
    """
    if batch_fn is None or callable(batch_fn):
        return batch_fn
    if not isinstance(batch_fn, str) or not batch_fn.strip():
        raise XAttnError(f"Expected batch_fn to be a callable or its import path but got {batch_fn!r}.")
    module, sep, name = batch_fn.partition(":") if ":" in batch_fn else batch_fn.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name) if sep and module else None
    except (ImportError, AttributeError) as err:
        raise XAttnError(f"batch_fn={batch_fn!r} could not be imported ({err}); give 'package.module:function'.") from None
    if not callable(fn):
        raise XAttnError(f"batch_fn={batch_fn!r} is not an importable callable; give 'package.module:function'.")
    return fn


def fix_lines(spec: InputSpec, features: str, labels: str | None) -> str:
    """The fix for a batch the monitor could not read alone, in both forms: a Python line and YAML."""
    keys = {spec.input_key: features, **({"labels": labels} if labels else {})}
    py = ", ".join(f'"{k}": "{v}"' for k, v in keys.items())
    yaml = ", ".join(f"{k}: {v!r}" if v.isdigit() else f"{k}: {v}" for k, v in keys.items())
    return (
        f"batch_keys={{{py}}} (YAML: batch_keys: {{{yaml}}}), or batch_fn=<a function, or its import path "
        f"'pkg.module:fn' in YAML, that returns {{'{spec.input_key}': Tensor, 'labels': Tensor}}>"
    )


def standard_batch(batch: Any, spec: InputSpec | str | None = None) -> dict[str, Any]:
    """``batch`` as the model's batch dict: the features under ``spec.input_key``, the target ids under
    ``labels`` (and a decoder input under ``dec_input_ids``) when the batch has them, the features' lengths,
    ids, texts and word timings; raises :class:`~xattn_lightning.XAttnError` listing the candidates and the
    line to write when the batch cannot be read alone.

    Args:
        batch: a training script's batch, in any of the forms of the module's description.
        spec: what the model takes (:meth:`Adapter.input_spec <xattn_lightning.Adapter.input_spec>`); a string:
            only the features key; ``None``: the Hugging Face convention, features of rank 2 or 3.

    Example:
        >>> feats, labels = torch.randn(2, 80, 3000), torch.randint(0, 9, (2, 5))
        >>> sorted(standard_batch((feats, labels)))
        ['input_features', 'labels']
        >>> sorted(standard_batch({"mel": feats, "targets": labels, "id": ["a", "b"]}))
        ['id', 'input_features', 'labels']
        >>> y_in = torch.tensor([[7, 1, 2, 3], [7, 4, 5, 0]])  # openai-whisper (mel, y_in, y_out), y_in padded with 0
        >>> y_out = torch.tensor([[1, 2, 3, 9], [4, 5, 9, -100]])
        >>> standard_batch((feats, y_in, y_out))["labels"] is y_out
        True
        >>> spec = InputSpec(feature_shape=(80, 3000), time_dim=1, vocab_size=10)
        >>> sorted(standard_batch({"feats_80": feats, "dec": y_in, "lab": y_out, "refs": ["a b", "c"]}, spec))
        ['dec_input_ids', 'input_features', 'labels', 'refs', 'text']
        >>> standard_batch((feats, labels, labels))
        Traceback (most recent call last):
        ...
        xattn_lightning.errors.XAttnError: The batch (a tuple of Tensor[2, 80, 3000] float32 at 0, ...) has 2 token-id tensors ...
    """
    if spec is None:
        spec = InputSpec()
    elif isinstance(spec, str):
        spec = InputSpec(input_key=spec)
    found = leaves(batch)
    what = f"a {type(batch).__name__} of " + ", ".join(f"{_describe(leaf.value)} at {leaf.where}" for leaf in found)
    feats = _features(found, spec, what)
    n = feats.value.shape[0]
    labels = _labels(found, feats, spec, what, n)
    moved = [feats, *(labels or ())]
    out: dict[str, Any] = {}
    if isinstance(batch, Mapping):  # a dict keeps its other entries (an attention mask, the adapter's own keys)
        out.update({k: v for k, v in batch.items() if isinstance(k, str)})
        for leaf in moved:
            if leaf is not None and len(leaf.path) == 1:
                out.pop(str(leaf.path[0]), None)  # placed again below under the model's names
    out[spec.input_key] = feats.value
    if labels is not None:
        out["labels"] = labels[0].value
        if labels[1] is not None:
            out["dec_input_ids"] = labels[1].value
    _lengths(found, feats, spec, n, out)
    _facts(found, n, out)
    return out


def _features(found: list[Leaf], spec: InputSpec, what: str) -> Leaf:
    shaped = [leaf for leaf in found if spec.matches(leaf.value)]
    if len(shaped) > 1:
        shaped = _by_name(shaped, (spec.input_key, *FEATURE_KEYS)) or shaped
    if len(shaped) == 1:
        return shaped[0]
    if shaped:
        options = " or ".join(repr(leaf.where) for leaf in shaped)
        raise XAttnError(
            f"The batch ({what}) has {len(shaped)} tensors shaped as the model's input ({spec.describe()}): "
            f"{options}; say which holds the features: {fix_lines(spec, shaped[0].where, None)}."
        )
    named = [leaf for leaf in found if leaf.name == spec.input_key and isinstance(leaf.value, Tensor)]
    if named:  # the model's own key: taken, and the adapter says what is wrong with its shape
        return named[0]
    floats = [leaf for leaf in found if isinstance(leaf.value, Tensor) and torch.is_floating_point(leaf.value)]
    if spec.feature_shape is None:
        loose = [leaf for leaf in floats if leaf.value.dim() in (2, 3)]
        loose = _by_name(loose, FEATURE_KEYS) or (loose if len(loose) == 1 else [])
        if len(loose) == 1:
            return loose[0]
    guess = floats[0].where if floats else "<path to the features>"
    raise XAttnError(
        f"The batch ({what}) has no features the model takes: {spec.describe()} (under {spec.input_key!r} or "
        f"anywhere else). Point at them or make them: {fix_lines(spec, guess, None)}."
    )


def _by_name(leaves_: list[Leaf], names: Sequence[str]) -> list[Leaf]:
    """The leaves with the first of ``names`` any of them has (empty when none has one)."""
    for name in names:
        hit = [leaf for leaf in leaves_ if leaf.name == name]
        if hit:
            return hit
    return []


def _is_ids(x: object, n: int, vocab: int | None) -> bool:
    """A ``[n, S]`` integer tensor of token ids: its non-negative values within ``vocab``, not a 0/1 mask."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != n or x.shape[1] < 1:
        return False
    if torch.is_floating_point(x) or x.is_complex() or x.dtype == torch.bool:
        return False
    real = x[x >= 0]
    if real.numel() == 0 or bool(((real == 0) | (real == 1)).all()):
        return False
    return vocab is None or int(real.max()) < vocab


def _labels(
    found: list[Leaf], feats: Leaf, spec: InputSpec, what: str, n: int
) -> tuple[Leaf, Leaf | None] | None:
    """``(labels, decoder input or None)``; ``None`` when the batch has no target ids."""
    cands = [
        leaf
        for leaf in found
        if leaf is not feats and "mask" not in leaf.name and _is_ids(leaf.value, n, spec.vocab_size)
    ]
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0], None
    pairs = []
    for i, a in enumerate(cands):
        for b in cands[i + 1 :]:
            which = shifted_labels(a.value, b.value)
            if which is not None:
                pairs.append((b, a) if which == 2 else (a, b))
    if len(pairs) == 1:
        return pairs[0]
    named = _by_name([p[0] for p in pairs] or cands, LABEL_KEYS)
    if len(named) == 1:
        dec = next((p[1] for p in pairs if p[0] is named[0]), None)
        return named[0], dec
    options = " or ".join(repr(leaf.where) for leaf in cands)
    ids = ", ".join(f"{leaf.where}: {_describe(leaf.value)}" for leaf in cands)
    raise XAttnError(
        f"The batch ({what}) has {len(cands)} token-id tensors ({ids}) and none is the other shifted by one token "
        f"(a decoder input and its labels), so which are the labels is ambiguous: {options}. Say it: "
        f"{fix_lines(spec, feats.where, cands[-1].where)}."
    )


def _real_lengths(x: Tensor) -> Tensor:
    """Per row, the positions before the first negative value (the padding of labels)."""
    neg = x < 0
    first = torch.where(neg.any(1), neg.int().argmax(1), torch.full_like(neg[:, 0], x.shape[1], dtype=torch.long))
    return first.long()


def shifted_labels(a: Tensor, b: Tensor) -> int | None:
    """``2`` when ``b`` is ``a`` shifted left by one token (``b`` are the labels, ``a`` the decoder input),
    ``1`` when ``a`` is ``b`` shifted, ``None`` when neither or both. Compared on real tokens only: each
    row up to the padding of whichever of the two is padded with a negative value (``-100``), so that a
    decoder input padded with ``0``, the pad id or EOT compares alike; where neither has negative padding,
    a direction that holds on nine positions in ten, with the other on fewer than half as many.

    Example:
        >>> y_in = torch.tensor([[7, 1, 2, 3], [7, 4, 5, 0]])
        >>> shifted_labels(y_in, torch.tensor([[1, 2, 3, 9], [4, 5, 9, -100]]))
        2
    """
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
        return None
    lengths = torch.minimum(_real_lengths(a), _real_lengths(b))

    def agreement(x: Tensor, y: Tensor) -> tuple[int, int]:  # y[:, j] == x[:, j + 1] for j + 1 < length
        cols = torch.arange(x.shape[1] - 1)
        real = cols[None] + 1 < lengths[:, None]
        return int((x[:, 1:] == y[:, :-1])[real].sum()), int(real.sum())

    (ab, n_ab), (ba, n_ba) = agreement(a, b), agreement(b, a)
    if n_ab == 0:
        return None
    if (ab == n_ab) != (ba == n_ba):
        return 2 if ab == n_ab else 1
    if ab == n_ab:  # both hold: which is which cannot be told
        return None
    if ab >= 0.9 * n_ab and ba < 0.5 * ab:
        return 2
    if ba >= 0.9 * n_ba and ab < 0.5 * ba:
        return 1
    return None


def _lengths(found: list[Leaf], feats: Leaf, spec: InputSpec, n: int, out: dict[str, Any]) -> None:
    """The features' lengths ``[B]`` (frames or samples, or relative in ``(0, 1]`` beside the features in a
    ``PaddedData``), under ``spec.length_key`` or as an attention mask."""
    if (spec.length_key or "attention_mask") in out:
        return
    frames = feats.value.shape[1 + spec.time_dim] if spec.feature_shape is not None else feats.value.shape[-1]
    for leaf in found:  # the features' own mask, beside them (a BatchFeature's)
        x = leaf.value
        if leaf.name == "attention_mask" and leaf.path[:-1] == feats.path[:-1] and isinstance(x, Tensor):
            if x.dim() == 2 and x.shape[0] == n and x.shape[1] == frames and not spec.length_key:
                out["attention_mask"] = x
                return
    if spec.feature_shape is None:
        return
    found_len: Tensor | None = None
    for leaf in found:
        x = leaf.value
        if not isinstance(x, Tensor) or x.dim() != 1 or x.shape[0] != n or leaf is feats:
            continue
        if torch.is_floating_point(x):
            beside = leaf.path[:-1] == feats.path[:-1] and len(leaf.path) > 1
            if beside and float(x.max()) == 1.0 and float(x.min()) > 0:
                found_len = (x * frames).round().long()
                break
        elif x.dtype != torch.bool and n and int(x.max()) == frames and int(x.min()) > 0:
            found_len = x.long()
            break
    if found_len is None:
        return
    if spec.length_key:
        out[spec.length_key] = found_len
    else:
        out["attention_mask"] = (torch.arange(frames, device=found_len.device)[None] < found_len[:, None]).long()


def _facts(found: list[Leaf], n: int, out: dict[str, Any]) -> None:
    """Ids, reference texts and word timings by their names; an unnamed list of ``n`` texts as the references."""
    per_utt = [leaf for leaf in found if isinstance(leaf.value, (list, tuple)) and len(leaf.value) == n]
    for keys in (ID_KEYS, TEXT_KEYS, (WORDS_KEY,)):
        hit = _by_name(per_utt, keys)
        if hit and keys[0] not in out and not any(k in out for k in keys):
            out[hit[0].name] = list(hit[0].value)
    if not any(k in out for k in TEXT_KEYS):
        texts = [
            leaf
            for leaf in per_utt
            if leaf.name not in ID_KEYS and all(isinstance(v, str) for v in leaf.value) and any(" " in v for v in leaf.value)
        ]
        if len(texts) == 1:
            out["text"] = list(texts[0].value)
