"""A training script's batch as the model's batch dict (:func:`standard_batch`): the features, labels, lengths,
ids, texts and word timings found by what they are (see :mod:`xattn_lightning.batches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xattn_lightning.batches.layout import (
    FEATURE_KEYS,
    ID_KEYS,
    LABEL_KEYS,
    TEXT_KEYS,
    WORDS_KEY,
    InputSpec,
    Leaf,
    _describe,
    leaves,
)
from xattn_lightning.batches.paths import fix_lines
from xattn_lightning.errors import XAttnError


def standard_batch(batch: Any, spec: InputSpec | str | None = None) -> dict[str, Any]:
    """``batch`` as the model's batch dict: the features under ``spec.input_key``, the target ids under
    ``labels`` (and a decoder input under ``dec_input_ids``) when the batch has them, the features' lengths,
    ids, texts and word timings; raises :class:`~xattn_lightning.XAttnError` listing the candidates and the
    line to write when the batch cannot be read alone.

    Args:
        batch: a training script's batch, in any of the forms :mod:`xattn_lightning.batches` describes.
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
