"""Encoder outputs of fixed probes, reused while the encoder does not change.

A monitor explains the same probes at every reading. When the encoder is frozen (a common way to
fine-tune Whisper) its output for a probe is the same every time, and on a CPU the encoder over
Whisper's 30-s window is about half of a probe's fixed cost. :class:`EncoderCache` keeps those
outputs and hands one back only when nothing that decides it has changed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from xattn_lightning.adapters.base import Adapter

__all__ = ["EncoderCache", "encoder_state"]


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _meta(module: nn.Module) -> tuple:
    """Mode, and each parameter's and buffer's storage, in-place version counter, dtype, device and shape."""
    return (
        module.training,
        tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in _tensors(module)),
    )


def _checksum(module: nn.Module) -> tuple:
    """Per-tensor float64 sums: also catch writes through ``.data``, which leave the version counter alone."""
    with torch.no_grad():
        sums = [t.detach().sum(dtype=torch.float64) for t in _tensors(module) if t.is_floating_point() and t.numel()]
        return tuple(torch.stack(sums).tolist()) if sums else ()


def encoder_state(module: nn.Module) -> tuple:
    """Everything that decides a module's output for given inputs, as a comparable tuple: its mode
    (training or not), and for each parameter and buffer its storage, in-place version counter,
    dtype, device, shape and checksum.

    >>> lin = nn.Linear(2, 2)
    >>> before = encoder_state(lin)
    >>> before == encoder_state(lin)
    True
    >>> with torch.no_grad():
    ...     _ = lin.weight.add_(1.0)
    >>> before == encoder_state(lin)
    False
    """
    return (_meta(module), _checksum(module))


def _fingerprint(features: Tensor) -> int:
    """A cheap key for the features (shape, dtype, device and two moments); equal features have equal
    keys, and a lookup still compares the values (:func:`torch.equal`)."""
    with torch.no_grad():
        x = features.detach().double()
        moments = (float(x.sum()), float((x * x).sum())) if x.numel() else ()
    return hash((tuple(features.shape), features.dtype, str(features.device), moments))


class EncoderCache:
    """Encoder outputs by input features, valid while the encoder's :func:`encoder_state` is unchanged.

    An output is reused only for equal features (same shape, dtype, device and values) and an
    encoder in the same state, in evaluation mode; anything else runs the encoder (and replaces the
    entry). Hand one cache to :func:`xattn_lightning.explain` over and over
    (``explain(..., encoder_cache=cache)``); :class:`~xattn_lightning.XAttnSaliencyMonitor` keeps one
    for its probes. ``hits`` and ``misses`` count the lookups.

    >>> import xattn_lightning as xl
    >>> from xattn_lightning.testing import TinyS2T
    >>> adapter = TinyS2T.adapter(TinyS2T(vocab_size=12).eval())
    >>> cache, batch = EncoderCache(), {"input_features": torch.randn(1, 16, 8)}
    >>> for _ in range(3):
    ...     _ = xl.explain(adapter, batch, targets=[[1, 5, 6, 2]], encoder_cache=cache)
    >>> cache.hits, cache.misses
    (2, 1)
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}.")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[int, tuple[Tensor, tuple, Tensor]] = OrderedDict()  # key: _fingerprint

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every stored output."""
        self._entries.clear()

    def encode(self, adapter: Adapter, features: Tensor) -> Tensor:
        """``adapter.encode(features)``, from the cache when valid. Returns a tensor the caller owns.

        The version counters are compared first (a trained encoder misses at once); the checksums
        only when they match."""
        module = adapter.encoder_module()
        if module is None or module.training:  # nothing to check against, or dropout: always run
            self.misses += 1
            return adapter.encode(features)
        meta = _meta(module)
        key = _fingerprint(features)
        entry = self._entries.get(key)
        if entry is not None and entry[1][0] == meta and torch.equal(entry[0], features):
            if entry[1][1] == _checksum(module):
                self.hits += 1
                self._entries.move_to_end(key)
                return entry[2].clone()
        self.misses += 1
        out = adapter.encode(features)
        # entries of another encoder state can only hit if the weights come back: drop them
        for k in [k for k, e in self._entries.items() if e[1][0] != meta]:
            del self._entries[k]
        self._entries[key] = (features.detach().clone(), (meta, _checksum(module)), out.detach().clone())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out
