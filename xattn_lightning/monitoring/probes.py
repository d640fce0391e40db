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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

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


def as_batch(item: dict[str, Any], input_key: str) -> dict[str, Any]:
    """A dataset item (features without a batch dimension) as a batch of one."""
    x = item.get(input_key)
    if isinstance(x, Tensor) and x.dim() == 2:
        return {k: (v.unsqueeze(0) if isinstance(v, Tensor) else [v]) for k, v in item.items()}
    return item


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

    def collect_source(self, to_model_batch: Callable[[Any], dict[str, Any]], input_key: str) -> None:
        """Take the probes from :attr:`source`, each batch turned into the model's format first."""
        src = self.source
        it = (src[i] for i in range(len(src))) if hasattr(src, "__getitem__") and hasattr(src, "__len__") else iter(src)
        self._seen, self._stride, self._offset = 0, 1, 0
        for batch in it:
            if not self.wants_more():
                break
            self.take(split_batch(as_batch(to_model_batch(batch), input_key)))

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
                f"no probe utterance could be taken from {where}; check that it yields utterances, or pass "
                "batch_fn=... that turns a batch into {'input_features': Tensor, 'labels': Tensor}."
            )
        few = len(self.items) < self.num_probes and not self.positions
        if not self.positions:
            self.positions = [p.position for p in self.items]
            self.ids = [p.id for p in self.items]
        self.final = True
        return self.items, few
