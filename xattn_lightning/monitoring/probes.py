"""The fixed probe utterances of a monitored run (no Lightning, no model).

Probes are kept by their position in the probe stream: the validation utterances in the order a
single process sees them (under DDP, each rank's shard is put back in that order), or the items of a
``probes=`` source. The positions and ids are the state a resume restores, so that a resumed run
explains exactly the utterances it explained before.

Example:
    >>> import torch
    >>> probes = ProbeSet(num_probes=3)
    >>> probes.take(split_batch({"input_features": torch.randn(2, 4, 8), "id": ["a", "b"]}))
    >>> probes.take(split_batch({"input_features": torch.randn(2, 4, 8), "id": ["c", "d"]}))
    >>> [p.id for p in probes.finalize()[0]], probes.positions
    (['a', 'b', 'c'], [0, 1, 2])
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from xattn_lightning.errors import XAttnError
from xattn_lightning.reading import Probe


def split_batch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split a batch dict into one dict per utterance (tensors cloned to CPU)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise XAttnError(
            f"Cannot split the batch into utterances: its tensors have batch sizes {sorted(sizes)}; "
            "pass batch_fn=... that returns only per-utterance tensors."
        )
    (n,) = sizes
    out = []
    for i in range(n):
        item: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, Tensor) and v.dim() > 0:
                item[k] = v[i : i + 1].detach().cpu().clone()
            elif isinstance(v, (list, tuple)) and len(v) == n:
                item[k] = [v[i]]
        out.append(item)
    return out


def _numeric(x: Any) -> bool:
    """A number, or a (nested) list of numbers: what ``torch.tensor`` makes a tensor of."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Number, list, tuple)):
        return False
    if isinstance(x, numbers.Number):
        return True
    return bool(x) and all(_numeric(v) for v in x[:3])


def collate_one(item: Any) -> Any:
    """A dataset item as a batch of one, its structure kept: tensors, arrays and (nested) lists of numbers
    get a batch dimension, texts and other values become one-element lists (what a collator would make of a
    single item, without one).

    Example:
        >>> b = collate_one({"input_features": [[0.1, 0.2], [0.3, 0.4]], "labels": [5, 6], "text": "hi"})
        >>> b["input_features"].shape, b["labels"].shape, b["text"]
        (torch.Size([1, 2, 2]), torch.Size([1, 2]), ['hi'])
    """
    if isinstance(item, Tensor):
        return item.unsqueeze(0)
    if isinstance(item, np.ndarray):
        return torch.from_numpy(item).unsqueeze(0)
    if isinstance(item, Mapping):
        return {k: collate_one(v) for k, v in item.items()}
    if isinstance(item, tuple) and hasattr(item, "_fields"):
        return type(item)(*(collate_one(v) for v in item))
    if _numeric(item) and not isinstance(item, numbers.Number):
        return torch.tensor(item).unsqueeze(0)
    if isinstance(item, numbers.Number) and not isinstance(item, bool):
        return torch.tensor([item])
    if isinstance(item, (tuple, list)) and any(isinstance(v, (Tensor, np.ndarray, Mapping)) for v in item):
        return type(item)(collate_one(v) for v in item)
    return [item]


def iter_once(source: Any) -> bool:
    """Whether ``source`` is a one-shot iterator (a generator): reading from it would take items from whoever
    else reads it.

    >>> iter_once(iter([1])), iter_once([1])
    (True, False)
    """
    return hasattr(source, "__next__") and iter(source) is source


def first_items(source: Any, n: int, what: str = "probes=") -> Iterator[Any]:
    """The first ``n`` items of a map-style or iterable dataset, in its own order, from a fresh iterator (the
    one training or evaluation uses is never touched). A one-shot iterator (a generator) is read as it is."""
    if not isinstance(source, IterableDataset) and hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        for i in range(min(n, len(source))):
            yield source[i]
        return
    if not hasattr(source, "__iter__"):
        raise XAttnError(
            f"Expected {what} to be a DataLoader, a Dataset (map-style or iterable) or a list of batches but got a "
            f"{type(source).__name__}."
        )
    yield from itertools.islice(iter(source), n)


def source_batches(source: Any, n: int) -> Iterator[tuple[Any, bool]]:
    """Batches of a ``probes=`` source, each with whether it is a collated batch (``False``: a dataset item,
    collated here if the model cannot read it as it is). A DataLoader gives its dataset's first items, each
    collated alone by its own ``collate_fn``, so that its sampler (shuffled or sharded) is never drawn from;
    a list holds batches; a Dataset (map-style, iterable or streaming) holds items."""
    if isinstance(source, DataLoader):
        loader: DataLoader = source
        auto = loader.batch_size is not None or loader.batch_sampler is not None
        for item in first_items(loader.dataset, n):
            yield (loader.collate_fn([item]) if auto else loader.collate_fn(item)), True
    elif isinstance(source, (list, tuple)):
        for batch in source:
            yield batch, False
    else:
        for item in first_items(source, n):
            yield collate_one(item), True


class ProbeSet:
    """The probe utterances of a run: the first ``num_probes`` of the validation stream
    (``source=None``) or of ``source`` (a DataLoader, a map-style Dataset or a list of batches);
    after a resume, exactly the stored :attr:`positions`.

    Args:
        num_probes: how many utterances to keep.
        source: the ``probes=`` of the monitor, or ``None`` for validation batches.
    """

    def __init__(self, num_probes: int, source: Any = None) -> None:
        self.num_probes = num_probes
        self.source = source
        #: stream positions and ids of the probes (restored on resume)
        self.positions: list[int] = []
        self.ids: list[str] = []
        self.items: list[Probe] = []
        self.final = False
        self._seen = 0
        self._stride, self._offset = 1, 0

    def start_pass(self, stride: int = 1, offset: int = 0) -> None:
        """A new pass over the stream (a validation epoch): this process sees items ``offset``,
        ``offset + stride``, ... of the global order."""
        self._seen = 0
        if not self.final:
            self._stride, self._offset = stride, offset

    def wants_more(self) -> bool:
        """Whether the set is still short of utterances."""
        if self.positions:  # resumed: collect exactly those positions
            return len(self.items) < len(self.positions)
        return len(self.items) < self.num_probes

    def take(self, items: Sequence[dict[str, Any]]) -> None:
        """Keep one-utterance batches by their global position in the stream (stable across epochs,
        resumes and world sizes)."""
        have = {p.position for p in self.items}
        for item in items:
            pos = self._seen * self._stride + self._offset
            self._seen += 1
            if pos in have or (self.positions and pos not in self.positions):
                continue
            if not self.wants_more():
                break
            default_id = f"probe{pos}" if self.source is not None else f"val{pos}"
            self.items.append(Probe.from_batch(pos, item, default_id))
        self.items.sort(key=lambda p: p.position)

    def collect_source(self, to_model_batch: Callable[[Any], dict[str, Any]]) -> None:
        """Take the probes from :attr:`source` (:func:`source_batches`), each batch turned into the model's
        format first; an item of a list that does not read as a batch is read as one dataset item."""
        self._seen, self._stride, self._offset = 0, 1, 0
        for batch, collated in source_batches(self.source, max(self.num_probes, max(self.positions, default=-1) + 1)):
            if not self.wants_more():
                break
            try:
                converted = to_model_batch(batch)
            except XAttnError:
                if collated:
                    raise
                converted = to_model_batch(collate_one(batch))
            self.take(split_batch(converted))

    def merge(self, shares: Sequence[Sequence[Probe] | None]) -> None:
        """Every process's share (each from its shard of validation), put back in the global order;
        the first probes (or the stored positions) are kept, so the set equals a single process's."""
        by_pos: dict[int, Probe] = {}
        for items in shares:
            for p in items or []:
                by_pos.setdefault(p.position, p)
        ordered = [by_pos[k] for k in sorted(by_pos)]
        if self.positions:
            ordered = [p for p in ordered if p.position in self.positions]
        self.items = ordered[: len(self.positions) or self.num_probes]

    def finalize(self) -> tuple[list[Probe], bool]:
        """Fix the set for the rest of the run: the probes, and whether fewer than ``num_probes`` were
        available (never said of a resumed set). Raises when none is."""
        if not self.items:
            where = "the probes= source" if self.source is not None else "the validation batches"
            raise XAttnError(
                f"{where} gave no utterance; check that it yields some, or pass batch_keys=... or batch_fn=... "
                "that turns a batch into {'input_features': Tensor, 'labels': Tensor}."
            )
        few = len(self.items) < self.num_probes and not self.positions
        if not self.positions:
            self.positions = [p.position for p in self.items]
            self.ids = [p.id for p in self.items]
        self.final = True
        return self.items, few
