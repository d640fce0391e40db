"""Lockstep readings: every process reads every probe, running the same forwards in the same order, each agreed.

A model whose *own* forward runs collectives (an ``all_reduce`` in ``forward``, as hand-written tensor-parallel
layers do: Megatron-core's or NeMo's ``RowParallelLinear``, say) hangs when processes run different forwards,
and a reading split across processes (process ``r`` explains probes ``r, r + world, ...``) runs different ones.
In a lockstep reading (``lockstep=True``, or ``"auto"`` when such collectives are seen) every process explains
every probe with the same masks and seeds, so the same forwards, and:

* every probe is a **step** agreed through the process group's store (:class:`~xattn_lightning.monitoring.
  exchange.BoundedExchange`, each round bounded by ``reading_timeout``): a round before the probe, one before
  each outermost module call of the explained model (:func:`gated_forwards`: the module's name and its inputs'
  shapes, which must be the same on every process), and one after it;
* a probe that raises on one process (anywhere outside the model's forward) fails that round on every process
  at once: every process skips that probe, with the same cause, and goes on with the next one;
* processes about to run different forwards (other modules, other shapes, more or fewer passes) fail that
  probe on every process *before* entering the forward, instead of meeting in mismatched collectives;
* a process late past ``reading_timeout`` fails the whole reading on every process (warned once);
* a process that cannot resolve its model (before the reading's first step) says so, and the others fail the
  reading at their first step at once instead of waiting ``reading_timeout`` for it.

Each process still gathers only its share of the rows (``probes[rank::world_size]``), so the reading's own
exchanges are the same in every mode and the gathered reading holds each probe once.

What stays unbounded: a process that fails or stalls *inside* a forward, between two of the model's own
collectives, leaves the others in that collective until the process group's own timeout (``timeout=`` of
``init_process_group``; Lightning's default 30 min). Nothing outside the collective can release them.

``"auto"`` (the default of the monitors) decides at each reading, on each process alone: a teacher-forced forward
of the first probe runs under :class:`CollectiveWatch` and stops at its first ``torch.distributed`` collective,
before running it (:func:`first_collective`); lockstep is on when there was one. A sharded model read through
its unsharded copy (:mod:`xattn_lightning.monitoring.sharded`) issues none of FSDP's collectives, so auto stays
off for plain FSDP/FSDP2/DDP. A model whose collectives run only outside a teacher-forced forward (in its own
``generate``, say) is not seen: pass ``lockstep=True``. A check forward that fails turns lockstep on (a
lockstep process never waits in a collective, only in a bounded exchange).

Example:
    >>> import torch
    >>> with CollectiveWatch() as seen:
    ...     _ = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    >>> seen.names
    []
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xattn_lightning.adapters import Adapter
from xattn_lightning.monitoring.exchange import LATE, BoundedExchange, ReadingFailed
from xattn_lightning.reading import Reading
from xattn_lightning.scores import Failure

T = TypeVar("T")
LockstepMode = bool | Literal["auto"]

#: namespaces of torch's collective operators, as a dispatch mode sees them (``c10d.allreduce_``, ...)
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")

_STATE: ContextVar[Lockstep | None] = ContextVar("xattn_lockstep", default=None)
#: the words of the verdict of a step that a process will not take part in (told apart from a fault in a probe)
LEFT = "left the reading before it began"


class StepFailed(RuntimeError):
    """A lockstep step (one probe) that failed on every process together, with the same cause on each."""


class CollectiveSeen(RuntimeError):
    """Raised by :class:`CollectiveWatch` ``(stop=True)`` in place of the first collective."""


class CollectiveWatch(TorchDispatchMode):
    """Records the ``torch.distributed`` collectives run inside it (:attr:`names`, e.g.
    ``["c10d.allreduce_.default"]``); everything runs as without it. ``stop=True``: the first collective is not
    run; :class:`CollectiveSeen` is raised in its place (so no other process needs to take part)."""

    def __init__(self, stop: bool = False) -> None:
        super().__init__()
        self.names: list[str] = []
        self.stop = stop

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Run ``func``, noting it when it is a collective."""
        name = str(func)
        if name.split(".", 1)[0] in COLLECTIVE_NAMESPACES:
            self.names.append(name)
            if self.stop:
                raise CollectiveSeen(name)
        return func(*args, **(kwargs or {}))


def first_collective(adapter: Adapter, batch: dict[str, Any]) -> list[str]:
    """The first ``torch.distributed`` collective that a teacher-forced forward of ``batch``'s first utterance (the
    decoder start prompt as target) runs, stopped there: it is never run, so this process alone decides, whatever
    the others do. ``[]`` when the forward runs none; what the forward raises otherwise is raised.

    >>> from xattn_lightning.testing import TinyS2T
    >>> first_collective(TinyS2T.adapter(TinyS2T()), {"input_features": torch.randn(1, 16, 8)})
    []
    """
    watch = CollectiveWatch(stop=True)
    utt = adapter.utterances(batch)[0]
    feats = utt.features[None].to(adapter.device, adapter.dtype)
    ids = torch.tensor([adapter.prompt_ids()], device=adapter.device)
    try:
        with adapter.capture_context(), torch.no_grad(), watch:
            adapter.forward(feats, ids, output_attentions=False)
    except CollectiveSeen:
        pass
    return watch.names


def _shapes(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    items = [*args, *(v for _, v in sorted(kwargs.items()))]
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in items)


@contextmanager
def gated_forwards(model: nn.Module, gate: Callable[[str, tuple], None]) -> Iterator[None]:
    """Inside it, ``gate(module name, input shapes)`` runs before each outermost call of ``model`` or one of its
    submodules (not before calls nested in another): the place to agree with the other processes before any
    collective of that call. What ``gate`` raises leaves the call before its forward runs.

    >>> seen = []
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> with gated_forwards(m, lambda name, shapes: seen.append((name, shapes))):
    ...     _ = m(torch.ones(1, 2)); _ = m[1](torch.ones(3))
    >>> seen
    [('', ((1, 2),)), ('1', ((3,),))]
    """
    depth = [0]
    names = {id(m): n for n, m in model.named_modules()}

    def pre(m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        if depth[0] == 1:
            gate(names.get(id(m), type(m).__name__), _shapes(args, kwargs))

    def post(m: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        depth[0] -= 1

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


class Lockstep:
    """The lockstep state of one reading on several processes (made by :func:`lockstep_reading`).

    Args:
        mode: ``True`` (lockstep), ``False`` (each process its share of the probes) or ``"auto"``.
        store, world_size, rank, timeout: as :class:`~xattn_lightning.monitoring.exchange.BoundedExchange`'s.
        reading: the reading's key namespace, the same on every process.
    """

    def __init__(
        self, mode: LockstepMode, store: Any, world_size: int, rank: int, timeout: float, reading: str
    ) -> None:
        self.on: bool | None = mode if isinstance(mode, bool) else None  # None: "auto", not decided yet
        self.store, self.world_size, self.rank, self.timeout = store, world_size, rank, timeout
        self.reading, self.steps = reading, 0
        #: the collectives the ``"auto"`` check saw on this process (``[]``: none)
        self.seen: list[str] = []
        #: every probe of the reading, which a lockstep reading reads on every process (set by :func:`share_of`)
        self.probes: list[Any] | None = None
        #: the explanations of every probe read so far (probe id -> explanation), which a re-read continues
        self.explanations: dict[str, Any] = {}

    def leave(self, why: str) -> None:
        """This process will not read (its model could not be resolved): the step the others wait at, or will, fails
        the whole reading on every process at once (none waits ``reading_timeout`` for it)."""
        ex = BoundedExchange(
            self.store, self.world_size, self.rank, self.timeout, reading=f"{self.reading}/{self.steps}"
        )
        ex.fail(f"process {self.rank} {LEFT} ({why})")

    def step(self, model: nn.Module, fn: Callable[[], T]) -> T:
        """``fn()`` on every process together: rounds before it, before each outermost call of ``model``
        (:func:`gated_forwards`) and after it. Raises :class:`StepFailed` on every process when it failed on one
        (the first cause, on all), :class:`ReadingFailed` when a process was late."""
        ex = BoundedExchange(
            self.store, self.world_size, self.rank, self.timeout, reading=f"{self.reading}/{self.steps}"
        )
        self.steps += 1
        try:
            ex.exchange(None, "start")
            with gated_forwards(model, lambda name, shapes: _same_forward(ex, name, shapes)):
                out = fn()
            ex.exchange(None, "done")
            return out
        except Exception as err:
            why = ex.failed if ex.failed is not None else ex.fail(f"process {self.rank}: {type(err).__name__}: {err}")
            if LATE in why or LEFT in why:
                raise ReadingFailed(why) from err
            raise StepFailed(why) from err

    def decide(self, adapter: Adapter, probes: Sequence[Any]) -> bool:
        """``"auto"``: lockstep when a teacher-forced forward of the first probe runs a collective
        (:func:`first_collective`; each process alone, the same model giving the same answer on every one), or
        when that forward fails: a lockstep process never waits in a collective, only in a bounded exchange."""
        if self.on is None:
            try:
                self.seen = first_collective(adapter, probes[0].batch)
            except Exception as err:
                self.seen = [f"(the check forward failed: {type(err).__name__}: {err})"]
            self.on = bool(self.seen)
        return self.on


def _same_forward(ex: BoundedExchange, name: str, shapes: tuple) -> None:
    """One round before a forward: every process about to run the same module on inputs of the same shapes."""
    parts = ex.exchange((name, shapes), "forward")
    if any(p != parts[0] for p in parts):
        which = "; ".join(f"process {r}: {n or '<model>'} {s}" for r, (n, s) in enumerate(parts))
        ex.failed = f"the processes were about to run different forwards ({which}); nothing was run"
        raise ReadingFailed(ex.failed)  # every process saw the same parts: all fail here, no round needed


@contextmanager
def lockstep_reading(
    mode: LockstepMode, store: Any, world_size: int, rank: int, timeout: float, reading: str
) -> Iterator[Lockstep | None]:
    """The lockstep state of the reading inside it (several processes and a store; else ``None``), which
    :func:`share_of`, :func:`read` and :func:`active` consult."""
    state = Lockstep(mode, store, world_size, rank, timeout, reading) if mode and store is not None else None
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def active() -> Lockstep | None:
    """The current reading's lockstep state when it reads in lockstep (every process every probe), else ``None``.

    >>> active() is None
    True
    """
    state = _STATE.get()
    return state if state is not None and state.on else None


def share_of(probes: list[T], host: Any, resolve: Callable[[], Adapter]) -> list[T]:
    """This process's share of the probes, ``probes[rank::world_size]``, which it gathers to the others. In a
    lockstep reading (``"auto"`` decides here, on ``resolve()``'s model) every process reads all of them
    (:func:`read`) and still contributes its share of the rows. A process whose ``resolve()`` fails tells the
    others it will not take part, so that none waits for it.

    >>> class One: world_size, rank = 1, 0
    >>> share_of([1, 2, 3], One(), lambda: None)
    [1, 2, 3]
    """
    mine = probes[host.rank :: host.world_size]
    state = _STATE.get()
    if state is None or host.world_size <= 1 or not probes:
        return mine
    try:
        adapter = resolve()
    except Exception as err:  # the reading says why on this process (resolve() fails again there)
        state.leave(f"{type(err).__name__}: {err}")
        return mine
    if state.decide(adapter, probes):
        state.probes = list(probes)
    return mine


#: reads probes one process alone: ``read_probes(probes, catch=..., resume=...)`` (a partial of
#: :func:`xattn_lightning.reading.read` over the adapter, the config and the encoder cache)
ProbeReader = Callable[..., Reading]


def read(
    read_probes: ProbeReader,
    model: nn.Module,
    probes: Sequence[Any],
    *,
    catch: tuple[type[BaseException], ...] = (Exception,),
    resume: Any = None,
) -> Reading:
    """``read_probes`` of ``probes`` (this process's share), in lockstep where a lockstep reading is active. There every
    probe of the reading is read, each one step of every process together (:meth:`Lockstep.step`, which watches
    ``model``'s forward), and the results and failures of ``probes`` are returned: a probe that fails on one process
    is a failure (of the ``catch`` types) on all, counted once, by the process whose share it is. ``resume`` (probe
    id -> explanation) continues every probe's maps, this process's share from ``resume``, the others' from the
    reading's last read. Outside a lockstep reading it is ``read_probes(probes, catch=catch, resume=resume)``.

    >>> from functools import partial
    >>> from xattn_lightning.testing import TinyS2T
    >>> from xattn_lightning.reading import Probe, ReadingConfig
    >>> from xattn_lightning.reading import read as read_alone
    >>> from xattn_lightning.saliency import SaliencyOptions
    >>> probe = Probe.from_batch(0, {"input_features": torch.randn(1, 16, 8)}, "p0")
    >>> config = ReadingConfig(targets=[[1, 5, 2]], saliency=SaliencyOptions.from_flat(n_masks=8))
    >>> adapter = TinyS2T.adapter(TinyS2T())
    >>> r = read(partial(read_alone, adapter, config=config), adapter.model, [probe])
    >>> [x.scores.id for x in r.results], r.failures
    (['p0'], [])
    """
    state = active()
    if state is None or state.probes is None:
        return read_probes(probes, catch=catch, resume=resume)
    mine = {p.position for p in probes}
    every = None if resume is None else {**state.explanations, **resume}
    out = Reading([], [])
    for p in state.probes:
        try:
            one = state.step(model, partial(read_probes, [p], catch=(), resume=every))
        except StepFailed as err:
            if not isinstance(err, catch):
                raise
            if p.position in mine:
                out.failures.append(Failure(p.id, str(err), p.position))
            continue
        state.explanations.update((r.probe.id, r.explanation) for r in one.results)
        if p.position in mine:
            out.results += one.results
    return out
