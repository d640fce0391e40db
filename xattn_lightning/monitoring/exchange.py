"""A reading's exchanges between processes through the process group's key-value store, each bounded.

A process that does not arrive within ``reading_timeout`` seconds, or that cannot take a step, makes the
exchange fail on every process together (one atomic verdict per round, the first proposal wins), and no
collective is ever left half done: training's own collectives stay matched and training goes on. Used by
:mod:`xattn_lightning.monitoring.sharded` (a reading's probe shards, mask count and rows) and
:mod:`xattn_lightning.monitoring.lockstep` (every probe and every forward of a lockstep reading).

Example:
    >>> ex = LocalExchange()
    >>> ex.all_gather("x"), ex.broadcast(3)
    (['x'], 3)
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import sys
from datetime import timedelta
from typing import Any

from xattn_lightning.monitoring.config import READING_TIMEOUT

#: the words of the verdict of a round that a process did not reach in time (told apart from a fault)
LATE = "did not reach this step of the reading within reading_timeout"


class ReadingFailed(RuntimeError):
    """A reading that failed on every process together (a process late past the bound, or a step that
    could not be done on one of them); training goes on."""


_READINGS = itertools.count()  # the same sequence on every process: every process reads at the same steps


class LocalExchange:
    """The exchanges of a one-process reading (nothing to wait for)."""

    world_size, rank = 1, 0

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """``obj``."""
        return obj


class BoundedExchange:
    """A reading's exchanges through a ``torch.distributed`` store, each bounded by ``timeout`` seconds of
    waiting. Each exchange is a round: every process posts its object, waits for the others', and proposes a
    verdict (``ok``: all arrived; ``fail``: the bound passed or this process failed); the first proposal is
    every process's verdict (the store's ``compare_set``). After a failed round every later one fails at once,
    so all processes leave the reading together. The caller's name travels with each object: processes at
    different exchanges fail the round instead of mixing their objects.

    Args:
        store: the process group's store (``torch.distributed.distributed_c10d._get_default_store()``).
        world_size, rank: the processes.
        timeout: seconds a process waits for the others at one round.
        reading: the reading's number, the same on every process (default: this process's count of readings).
    """

    def __init__(
        self, store: Any, world_size: int, rank: int, timeout: float = READING_TIMEOUT, reading: int | str | None = None
    ) -> None:
        self.store, self.world_size, self.rank, self.timeout = store, world_size, rank, float(timeout)
        self.reading = next(_READINGS) if reading is None else reading  # the keys' namespace
        self.round = 0
        self.failed: str | None = None

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        return self.exchange(obj, _caller())

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        return self.exchange(obj, _caller())[0]

    def fail(self, why: str) -> str:
        """This process cannot go on: the current round fails on every process (none waits the bound). Returns
        the round's verdict, the same on every process (``why``, or what another process proposed first)."""
        if self.failed is None:
            self._post(("fail", why, None))
            verdict = self._verdict(b"fail:" + why.encode())
            if verdict == b"ok":  # every process had posted: the first fault among the posts, as exchange() reads it
                parts = [pickle.loads(self.store.get(self._key(r))) for r in range(self.world_size)]
                verdict = b"fail:" + next(p[1] for p in parts if p[0] == "fail").encode()
            self.failed = verdict.decode()[5:]
        return self.failed

    def exchange(self, obj: Any, tag: str) -> list[Any]:
        """One round: every process's ``obj`` (posted under ``tag``), or :class:`ReadingFailed` on all."""
        if self.failed is not None:
            raise ReadingFailed(self.failed)
        self._post(("ok", tag, obj))
        keys = [self._key(r) for r in range(self.world_size)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout))
            proposal = b"ok"
        except RuntimeError:  # DistStoreError: the bound passed
            late = [r for r in range(self.world_size) if not self.store.check([self._key(r)])]
            proposal = f"fail:process {late} {LATE}={self.timeout:g} s".encode()
        verdict = self._verdict(proposal)
        parts = [pickle.loads(self.store.get(k)) for k in keys] if verdict == b"ok" else []
        if verdict == b"ok":
            faults = [p[1] for p in parts if p[0] == "fail"]
            tags = {p[1] for p in parts if p[0] == "ok"}
            if faults:
                verdict = b"fail:" + faults[0].encode()
            elif len(tags) > 1:
                verdict = f"fail:the processes were at different steps of the reading ({sorted(tags)})".encode()
        self._forget_previous(everyone_posted=bool(parts))
        self.round += 1
        if verdict != b"ok":
            self.failed = verdict.decode()[5:]
            raise ReadingFailed(self.failed)
        return [p[2] for p in parts]

    def _key(self, rank: int, round: int | None = None) -> str:
        return f"xattn/{self.reading}/{self.round if round is None else round}/{rank}"

    def _post(self, part: tuple[str, str, Any]) -> None:
        self.store.set(self._key(self.rank), pickle.dumps(part))

    def _verdict(self, proposal: bytes) -> bytes:
        return bytes(self.store.compare_set(f"xattn/{self.reading}/{self.round}/verdict", "", proposal))

    def _forget_previous(self, everyone_posted: bool) -> None:
        """This process has read the previous round: drop its post there; when every process posted in this round,
        all have read the previous verdict too, and process 0 drops it (a lockstep reading runs many rounds)."""
        if self.round > 0:
            with contextlib.suppress(RuntimeError):  # a store without delete_key keeps it
                self.store.delete_key(self._key(self.rank, self.round - 1))
                if everyone_posted and self.rank == 0:
                    self.store.delete_key(f"xattn/{self.reading}/{self.round - 1}/verdict")


def _caller() -> str:
    """The qualified name of the function that called the caller (``Instrument._gather``, say)."""
    frame = sys._getframe(2)
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


def default_store() -> Any:
    """The store of torch's default process group (torch keeps it private; ``None`` when torch moved it)."""
    import torch.distributed as dist

    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    return getter() if getter is not None and dist.is_initialized() else None


class ShardedHost:
    """A host whose exchanges are bounded (its other methods: the host's)."""

    def __init__(self, host: Any, exchange: BoundedExchange) -> None:
        self.host, self.exchange = host, exchange
        self.world_size, self.rank = host.world_size, host.rank

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (bounded; the caller's name travels with it)."""
        return self.exchange.exchange(obj, _caller())

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` (bounded; the caller's name travels with it)."""
        return self.exchange.exchange(obj, _caller())[0]

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """The host's."""
        self.host.log_scalars(scalars, step)

    def media_loggers(self) -> list[Any]:
        """The host's."""
        return list(self.host.media_loggers())
