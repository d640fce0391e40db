"""A user's own directions into a batch: dotted paths (:func:`select_keys`), a ``batch_fn`` or its import path
(:func:`resolve_batch_fn`), and the line that says how to write them (:func:`fix_lines`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from xattn_lightning.batches.layout import InputSpec, leaves
from xattn_lightning.errors import XAttnError


def select_keys(batch: Any, batch_keys: Mapping[str, str]) -> dict[str, Any]:
    """The model's batch from the dotted paths ``batch_keys`` (model key -> where it sits in ``batch``):
    dict keys, tuple positions and attribute names, e.g. ``{"input_features": "net_input.src_tokens",
    "labels": "target"}`` or ``{"input_features": "0", "labels": "2"}``.

    Example:
        >>> import torch
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
