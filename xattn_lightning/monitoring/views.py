"""What a monitor knows, read-only, the same on every host: :class:`InstrumentViews`, mixed into the Lightning
and the Hugging Face callbacks, which hold an :class:`~xattn_lightning.monitoring.Instrument`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xattn_lightning.monitoring.config import MonitorConfig
from xattn_lightning.monitoring.core import Instrument


class InstrumentViews:
    """What a monitor knows, read-only, the same on every host (mixed into the callbacks, which hold an
    :attr:`instrument`)."""

    instrument: Instrument

    @property
    def config(self) -> MonitorConfig:
        """The reading options."""
        return self.instrument.config

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict of logged scalars per reading (``step``, ``epoch``, ``log_step`` and the scalars)."""
        return self.instrument.publisher.history.entries

    @property
    def alignment_heads(self) -> list[list[int]] | None:
        """The heads the last reading with timed probes chose for word timestamps."""
        return self.instrument.publisher.alignment_heads

    @property
    def head_ranking(self) -> dict[str, list[tuple[int, int, float]]]:
        """Method → every ``(layer, head, ρ)`` of the last reading, best first."""
        return self.instrument.publisher.head_ranking

    @property
    def last_explanations(self) -> list[Any]:
        """The explanations of the last reading (those drawn, under several processes)."""
        return self.instrument.publisher.last_explanations

    @property
    def first_explanations(self) -> list[Any]:
        """The explanations of the first reading (what the model did before training changed it)."""
        return self.instrument.publisher.first_explanations

    @property
    def skipped_steps(self) -> list[int]:
        """Steps of the readings ``max_overhead`` thinned."""
        return self.instrument.reader.skipped_steps

    @property
    def probe_ids(self) -> list[str]:
        """The probes' ids (kept in checkpoints)."""
        return self.instrument.collector.probe_set.ids

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of the readings' cost and of the overhead budget (settable: a fake clock in tests)."""
        return self.instrument.reader.budget.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.instrument.reader.budget.clock = clock
