"""Collecting a monitor's probes: the host's batches turned into the model's (``batch_fn``, ``batch_keys``, or
read by what they hold), kept from validation or taken from a ``probes=`` source, fixed once and the same on
every process (:class:`ProbeCollector`, over :class:`~xattn_lightning.monitoring.probes.ProbeSet`).

Example:
    >>> import torch
    >>> from xattn_lightning.monitoring.messages import Messages
    >>> batch = {"input_features": torch.randn(2, 16, 8), "labels": torch.tensor([[1, 5, 6, 2], [1, 6, 5, 2]])}
    >>> collector = ProbeCollector(2, [batch], Messages())
    >>> [p.id for p in collector.probes(SingleProcessExchange(), lambda: None)]
    ['probe0', 'probe1']
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from xattn_lightning.adapters import Adapter
from xattn_lightning.batches import resolve_batch_fn, select_keys, standard_batch
from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.monitoring.probes import ProbeSet, split_batch
from xattn_lightning.reading import Probe


class IsolatedRng:
    """A reading leaves every random stream (torch, CUDA, numpy, python) as it found it, so that training
    draws the same numbers with and without the monitor."""

    def __enter__(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.states = (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def __exit__(self, *exc: object) -> None:
        cpu, cuda, np_state, py_state = self.states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


class SingleProcessExchange:
    """The exchange of one process: ``world_size`` 1, ``all_gather`` gives ``[obj]``."""

    world_size = 1
    rank = 0

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]


class ProbeCollector:
    """The probes of a run and how a host's batch becomes the model's.

    Args:
        num_probes: how many probe utterances.
        source: the host's ``probes=`` (``None``: validation batches, handed to :meth:`take_validation_batch`).
        messages: the warning policy.
        batch_fn: turns a script's batch into the model's (a callable or its import path), when the batch
            cannot be read by what it holds.
        batch_keys: or, where the model's entries sit in the script's batch (``{"input_features": "feats"}``).
        raise_errors: ``on_error="raise"``: a probe set that cannot be made raises instead of a warning.
    """

    def __init__(
        self,
        num_probes: int,
        source: Any,
        messages: Messages,
        batch_fn: Callable[[Any], Any] | str | None = None,
        batch_keys: dict[str, str] | None = None,
        raise_errors: bool = False,
    ) -> None:
        if batch_fn is not None and batch_keys:
            raise XAttnError("Pass batch_fn= or batch_keys=, not both.")
        self.batch_fn = resolve_batch_fn(batch_fn)
        self.batch_keys = dict(batch_keys) if batch_keys else None
        self.probe_set = ProbeSet(num_probes, source)
        self.messages = messages
        self.raise_errors = raise_errors
        #: no probe set can be made: said once, with the fix (the hosts then skip readings quietly)
        self.unavailable = False

    @property
    def where(self) -> str:
        """Where the probes come from, for messages."""
        return "the probes= source" if self.probe_set.source is not None else "the validation batches"

    def model_batch(self, batch: Any, adapter: Adapter | None) -> dict[str, Any]:
        """A host's batch in the model's format: ``batch_fn`` or ``batch_keys`` first, then read by what it
        holds, given what the model takes (:meth:`Adapter.model_batch`; without a model, by the usual names)."""
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        elif self.batch_keys:
            batch = select_keys(batch, self.batch_keys)
        return adapter.model_batch(batch) if adapter is not None else standard_batch(batch)

    def take_validation_batch(self, batch: Any, adapter: Adapter | None) -> None:
        """Keep probe utterances from a validation batch while the set is short of them."""
        probes = self.probe_set
        if probes.source is not None or probes.final or not probes.wants_more():
            return
        try:
            items = split_batch(self.model_batch(batch, adapter))
        except Exception as err:  # one warning for every batch of that shape, not one per batch
            self.problem(err)
            return
        probes.take(items)

    def problem(self, err: Exception) -> None:
        """The one message of a probe set that cannot be made (said once, whenever it is found)."""
        if self.raise_errors:
            raise err
        self.unavailable = True
        self.messages.warn_once("probes", f"nothing will be read: no probe utterance could be taken from {self.where}. {err}")

    def check_before_training(self, adapter: Adapter, sample: Callable[[], Any] | None = None) -> None:
        """Before the first training step: fix the probe set of a ``probes=`` source, or read ``sample()`` (one
        validation batch, ``None`` when there is none), so that a monitor that will read nothing says so now,
        with the fix. Random streams are left as they were."""
        probes = self.probe_set
        with IsolatedRng():
            try:
                if probes.source is not None:
                    if not probes.final:
                        probes.collect_source(lambda b: self.model_batch(b, adapter))
                        self._finalize()
                elif sample is not None and not probes.final:
                    batch = sample()
                    if batch is not None:
                        split_batch(self.model_batch(batch, adapter))
            except Exception as err:
                self.problem(err)

    def _finalize(self) -> list[Probe]:
        items, few = self.probe_set.finalize()
        if few:
            self.messages.warn_once(
                "few",
                f"only {len(items)} probe utterances available (num_probes={self.probe_set.num_probes}); using those.",
            )
        return items

    def probes(self, exchange: Any, adapter: Callable[[], Adapter | None]) -> list[Probe]:
        """The fixed probe set, the same on every process (``exchange``: the host's ``world_size`` and
        ``all_gather``; ``adapter()``: the model, asked only of a ``probes=`` source). Processes that took
        validation shards merge them here, first thing in a reading, before anything that may fail on one
        process only."""
        probes = self.probe_set
        if not probes.final:
            if probes.source is not None:
                found = adapter()
                probes.collect_source(lambda b: self.model_batch(b, found))
            elif exchange.world_size > 1:  # each process took its shard of validation
                probes.merge(exchange.all_gather(probes.items))
            self._finalize()
        return probes.items
