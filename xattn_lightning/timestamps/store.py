"""A model's head choice kept on disk, so that :func:`~xattn_lightning.timestamps.choice.choose_heads` runs once
per model, not once per process: a small JSON file per model under the cache directory, keyed by a fingerprint of
the model's weights (a strided sample of every parameter and buffer, with names, shapes and dtypes) and of the
choice's settings. Changed weights, another dtype or other settings give another key, so a stale choice is never
read. The directory is ``$XATTN_LIGHTNING_CACHE`` (``off`` turns the disk cache off), else
``$XDG_CACHE_HOME/xattn_lightning``, else ``~/.cache/xattn_lightning``. Knows no model type: it hashes any
:class:`torch.nn.Module`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the environment variable naming the cache directory; ``off`` (or ``0``, ``none``, ``false``, empty) turns the
#: disk cache off
CACHE_ENV = "XATTN_LIGHTNING_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
#: values sampled from each parameter and buffer for :func:`weights_fingerprint`
FINGERPRINT_SAMPLES = 256
_FORMAT = 1  # bump when the stored fields change


def cache_dir() -> Path | None:
    """The directory of xattn_lightning's disk cache, ``None`` when ``$XATTN_LIGHTNING_CACHE`` turns it off.

    >>> import os; os.environ["XATTN_LIGHTNING_CACHE"] = "off"; cache_dir() is None
    True
    >>> os.environ["XATTN_LIGHTNING_CACHE"] = "/tmp/xl-cache"; str(cache_dir())
    '/tmp/xl-cache'
    >>> del os.environ["XATTN_LIGHTNING_CACHE"]
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xattn_lightning"


def weights_fingerprint(model: nn.Module, samples: int = FINGERPRINT_SAMPLES) -> str | None:
    """A hex digest of ``model``'s weights: every parameter's and buffer's name, shape and dtype and ``samples``
    values spread evenly over it (any training step, merged adapter or other precision changes them). ``None``
    when a tensor cannot be read (meta or sharded tensors): then nothing is cached on disk.

    >>> m = nn.Linear(3, 2); a = weights_fingerprint(m)
    >>> with torch.no_grad(): _ = m.weight.add_(1e-3)
    >>> a == weights_fingerprint(m), len(a)
    (False, 64)
    """
    digest = hashlib.sha256()
    picked: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for name, t in chain(model.named_parameters(), model.named_buffers()):
                digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
                if t.is_meta or type(t) not in (torch.Tensor, nn.Parameter):
                    return None  # meta, DTensor, DeepSpeed's partitioned parameters: no values here
                flat = (t.to_dense() if t.is_sparse else t).detach().reshape(-1)  # openai-whisper's heads
                if flat.numel():
                    k = min(flat.numel(), samples)
                    idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)  # exact
                    picked.append(flat[idx].float())
        if picked:
            digest.update(torch.cat([p.cpu() for p in picked]).numpy().tobytes())
    except (RuntimeError, TypeError, ValueError):
        return None
    return digest.hexdigest()


def cache_key(model: nn.Module, settings: Mapping[str, Any]) -> str | None:
    """The disk cache's key for ``model`` under ``settings`` (JSON-able: whatever changes the result), ``None``
    when its weights cannot be fingerprinted.

    >>> cache_key(nn.Linear(3, 2), {"k": 1}) != cache_key(nn.Linear(3, 2), {"k": 1})  # other random weights
    True
    """
    weights = weights_fingerprint(model)
    if weights is None:
        return None
    text = json.dumps({"format": _FORMAT, "model": type(model).__qualname__, "weights": weights, **settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _path(kind: str, key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / kind / f"{key}.json"


def load(kind: str, key: str | None) -> dict[str, Any] | None:
    """What :func:`save` kept under ``kind``/``key``, ``None`` when nothing is (or the disk cache is off); an
    unreadable file is warned about and ignored.

    >>> import os, tempfile; os.environ["XATTN_LIGHTNING_CACHE"] = tempfile.mkdtemp()
    >>> load("heads", "abc") is None
    True
    >>> _ = save("heads", "abc", {"name": "all"}); load("heads", "abc")
    {'name': 'all'}
    >>> del os.environ["XATTN_LIGHTNING_CACHE"]
    """
    path = _path(kind, key) if key else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("value"), dict):
            raise ValueError("not a cache entry of this version")
        value: dict[str, Any] = data["value"]
        return value
    except (OSError, ValueError) as e:
        warnings.warn(f"Ignored the unreadable cache file {path} ({e}); it will be written again.", stacklevel=2)
        return None


def save(kind: str, key: str | None, value: Mapping[str, Any]) -> Path | None:
    """Keep ``value`` (JSON-able) under ``kind``/``key``, written atomically; returns the file, ``None`` when the
    disk cache is off or the directory cannot be written (warned about: the value then lives in memory only).

    >>> import os, tempfile; os.environ["XATTN_LIGHTNING_CACHE"] = tempfile.mkdtemp()
    >>> save("heads", "abc", {"name": "all"}).name
    'abc.json'
    >>> del os.environ["XATTN_LIGHTNING_CACHE"]
    """
    path = _path(kind, key) if key else None
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, "value": dict(value)}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(
            f"Could not write the cache file {path} ({e}); kept in memory only. Set {CACHE_ENV} to a writable "
            f"directory, or to 'off'.",
            stacklevel=2,
        )
        return None
    return path


def remove(kind: str, key: str | None) -> None:
    """Delete what :func:`save` kept under ``kind``/``key``, if anything.

    >>> remove("heads", None)
    """
    path = _path(kind, key) if key else None
    if path is not None:
        path.unlink(missing_ok=True)
