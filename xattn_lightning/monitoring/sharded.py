"""A reading under several processes and sharded models: bounded, all-or-nothing, never a hang.

Two things make a reading safe when training runs on several processes, with or without a sharded model
(FSDP, FSDP2/``fully_shard``, tensor parallel DTensors):

* **Every exchange of a reading is bounded** (:class:`~xattn_lightning.monitoring.exchange.BoundedExchange`,
  in :mod:`xattn_lightning.monitoring.exchange`). The processes exchange a reading's
  objects (probe shards, the mask count, the scored rows) through the process group's key-value store, not
  through collectives: a process that does not arrive within ``reading_timeout`` seconds makes the reading
  fail on every process together (one atomic verdict per exchange, first proposal wins), and no collective is
  left half done, so training's own collectives stay matched and training goes on.
* **A sharded model is read through an unsharded copy** (:func:`unsharded_adapter`). Every forward of a
  sharded module is a collective, and the probes a process explains take a different number of forwards
  (different lengths, different generated tokens), so reading the sharded module itself would leave a
  process waiting in an all-gather. Once per reading, after every process said it is ready, the full
  parameters are gathered with torch's own ``get_model_state_dict(full_state_dict=True)`` (the same
  collectives on every process, independent of the probes) into a plain copy of the explained model; the
  probes are then read on the copy with no collective at all, each process its share, exactly as under DDP.
  The copy costs the explained model's full parameters on each process, for the length of the reading;
  ``max_gathered_gb`` bounds it, and a reading that would exceed it is skipped on every process, said once.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> sharding_of(model) is None, full_bytes(model)
    (True, 24)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xattn_lightning.adapters import Adapter
from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring.config import READING_TIMEOUT
from xattn_lightning.monitoring.exchange import (  # noqa: F401  (re-exported: the names of this module before the split)
    BoundedExchange,
    LocalExchange,
    ReadingFailed,
    ShardedHost,
    default_store,
)
from xattn_lightning.monitoring.lockstep import LockstepMode, lockstep_reading

#: wrapper attributes a sharded or compiled module nests the user's module under (not part of parameter names)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


# ---------------------------------------------------------------- what a model's sharding is
def _fsdp_classes() -> tuple[type, ...]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return FullyShardedDataParallel, FSDPModule


def sharding_of(module: nn.Module) -> str | None:
    """The kind of sharding of ``module`` (``"FSDP"``, ``"FSDP2"``, ``"DTensor"``, ``"DeepSpeed ZeRO-3"``), or
    ``None`` when its parameters are whole on every process (a plain module, DDP, DeepSpeed ZeRO-1/2)."""
    fsdp1, fsdp2 = _fsdp_classes()
    for m in module.modules():
        if isinstance(m, fsdp1):
            return "FSDP"
        if isinstance(m, fsdp2):
            return "FSDP2"
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if isinstance(p, DTensor):
            return "DTensor"
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
    return None


def full_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers when whole (gathered), read from the shards' metadata.

    >>> full_bytes(nn.Linear(3, 1))  # 3 weights and a bias, float32
    16
    """
    fsdp1, _ = _fsdp_classes()
    total, counted = 0, set()
    for m in module.modules():
        flat = getattr(getattr(m, "_handle", None), "flat_param", None) if isinstance(m, fsdp1) else None
        if flat is not None:  # FSDP: the flat parameter knows its unsharded size
            total += int(flat._unpadded_unsharded_size.numel()) * flat.element_size()
            counted.add(id(flat))
    for p in module.parameters():
        if id(p) in counted or getattr(p, "_fsdp_flattened", False):
            continue
        total += p.numel() * p.element_size()  # a DTensor's numel is the whole tensor's
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


# ---------------------------------------------------------------- the unsharded copy
def clean_name(name: str) -> str:
    """A parameter or module name without the wrappers' attributes (FSDP, activation checkpointing, compile).

    >>> clean_name("_fsdp_wrapped_module.model._checkpoint_wrapped_module.fc.weight")
    'model.fc.weight'
    """
    for prefix in WRAPPER_PREFIXES[:3]:
        name = name.replace(prefix, "")
    return name


def _plain_class(m: nn.Module) -> type[nn.Module]:
    _, fsdp2 = _fsdp_classes()
    cls: type[nn.Module] = type(m)
    if isinstance(m, fsdp2):  # fully_shard made a class FSDP<cls>(FSDPModule, cls)
        cls = next(c for c in cls.__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, fsdp2))
    return cls


def _unwrapped(m: nn.Module) -> nn.Module:
    while True:
        inner = getattr(m, "_fsdp_wrapped_module", None) or getattr(m, "_checkpoint_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            return m
        m = inner


def _skeleton(m: nn.Module, twins: dict[int, nn.Module]) -> nn.Module:
    """A plain module of ``m``'s class and attributes, no parameters, no hooks; children likewise."""
    m = _unwrapped(m)
    new: nn.Module = object.__new__(_plain_class(m))
    nn.Module.__init__(new)  # fresh parameter, buffer, module and hook dicts
    for key, value in vars(m).items():
        if key not in vars(new) and "fsdp" not in key:  # e.g. _is_fsdp_managed_module: HF generate would sync
            new.__dict__[key] = value
    for name, b in m._buffers.items():  # buffers are never sharded: the process's own are whole
        if b is not None:
            new._buffers[name] = b
            new.__dict__.pop(name, None)
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    for name, p in m._parameters.items():
        if p is None:  # an absent bias: still an attribute of the module
            new._parameters[name] = None
    for name, child in m._modules.items():
        new._modules[name] = _skeleton(child, twins) if child is not None else None
        new.__dict__.pop(name, None)
    twins[id(m)] = new
    return new


def plain_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[int, nn.Module]]:
    """An unsharded, hook-free copy of ``module`` whose parameters are ``state`` (full tensors by clean
    name, e.g. from ``get_model_state_dict(full_state_dict=True)``), and the map from the ids of ``module``'s
    submodules to their copies. The copy does not train (``requires_grad=False``) and shares nothing that
    training changes.

    >>> lin = nn.Linear(2, 1)
    >>> twin, _ = plain_copy(lin, {k: v.clone() for k, v in lin.state_dict().items()})
    >>> bool(torch.equal(twin(torch.ones(1, 2)), lin(torch.ones(1, 2)))), twin.weight is lin.weight
    (True, False)
    """
    twins: dict[int, nn.Module] = {}
    root = _skeleton(module, twins)
    for name, tensor in state.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        owner.__dict__.pop(leaf, None)  # FSDP leaves a plain tensor attribute where a parameter was
        if leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    missing = [
        n for n, m in root.named_modules() for leaf in _param_names(_find(module, n)) if leaf not in m._parameters
    ]
    if missing:
        raise XAttnError(f"the gathered parameters miss {len(missing)} of the model's ({missing[:3]}...).")
    return root, twins


def _find(module: nn.Module, clean: str) -> nn.Module:
    named = {clean_name(n): m for n, m in module.named_modules()}
    return _unwrapped(named[clean])


def _param_names(m: nn.Module) -> list[str]:
    fsdp1, _ = _fsdp_classes()
    return [] if isinstance(m, fsdp1) else [n for n, p in m._parameters.items() if p is not None and n != "_flat_param"]


def gather_full_state(root: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The full parameters and buffers of ``root``'s submodule at ``prefix`` (a clean name), on every process:
    torch's ``get_model_state_dict(full_state_dict=True)``, the same collectives on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    head = prefix + "." if prefix else ""
    out = {}
    for name, t in full.items():
        name = clean_name(name)
        if name.startswith(head) and isinstance(t, torch.Tensor):
            out[name[len(head) :]] = t.detach()
    return out


def unsharded_adapter(adapter: Adapter, state: dict[str, torch.Tensor]) -> Adapter:
    """``adapter`` over a plain copy of its model made of ``state``: every module the adapter holds (an
    encoder, attention modules) points into the copy."""
    model, twins = plain_copy(adapter.model, state)
    out = copy.copy(adapter)
    out.model = model
    for key, value in list(vars(out).items()):
        if isinstance(value, nn.Module) and id(value) in twins:
            setattr(out, key, twins[id(value)])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Module) for v in value):
            setattr(out, key, type(value)(twins.get(id(v), v) for v in value))
    return out


def path_in(root: nn.Module, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The clean name of ``module`` inside ``root`` (``""``: the root itself) and its outermost wrapper there
    (an FSDP unit, say), ``None`` when it is not there."""
    for name, m in root.named_modules():
        if m is module or _unwrapped(m) is module:
            return clean_name(name).rstrip("."), m
    return None


# ---------------------------------------------------------------- one guarded reading
def _resolver(adapter: Adapter | Callable[[], Adapter]) -> Callable[[], Adapter]:
    return adapter if callable(adapter) and not isinstance(adapter, Adapter) else lambda: adapter


@contextmanager
def guarded_reading(
    host: Any,
    adapter: Adapter | Callable[[], Adapter],
    root: nn.Module | None,
    timeout: float = READING_TIMEOUT,
    max_gathered_gb: float | None = None,
    warn: Callable[[str, str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    lockstep: LockstepMode = False,
) -> Iterator[tuple[Any, Callable[[], Adapter], dict[str, float]]]:
    """A reading's host and adapter: exchanges bounded by ``timeout`` when several processes read; when
    ``root`` (the module the strategy trains) is sharded, the adapter is resolved on every process, then over
    an unsharded copy of its model gathered once (at most ``max_gathered_gb`` GiB, else the reading is skipped
    on every process). A :class:`ReadingFailed` inside is warned through ``warn(key, message)`` and ends the
    reading; the third value says what the copy cost (``gathered_gb``, ``gather_seconds``). ``lockstep``
    (``True``, ``False``, ``"auto"``): whether every process reads every probe, each forward agreed
    (:mod:`xattn_lightning.monitoring.lockstep`).
    """
    store = default_store() if host.world_size > 1 else None
    exchange: BoundedExchange | LocalExchange = (
        BoundedExchange(store, host.world_size, host.rank, timeout) if store is not None else LocalExchange()
    )
    bounded = ShardedHost(host, exchange) if isinstance(exchange, BoundedExchange) else host
    resolve = _resolver(adapter)
    kind = sharding_of(root) if root is not None else None
    cost: dict[str, float] = {}
    made: list[Adapter] = []

    def unsharded() -> Adapter:
        if made:
            return made[0]
        assert root is not None and kind is not None
        status, size, base, where = "ready", 0, None, None
        try:
            base = resolve()
            where = path_in(root, base.model)
            size = full_bytes(where[1]) if where is not None else 0
            if kind == "DeepSpeed ZeRO-3":
                status = (
                    "a DeepSpeed ZeRO-3 model is not read: gathering its parameters is untested here (no GPU); "
                    "use ZeRO-2 (whole parameters on each process) or FSDP"
                )
            elif where is None:
                status = f"the explained model ({type(base.model).__name__}) is not inside the sharded module"
        except Exception as err:
            status = f"{type(err).__name__}: {err}"
        statuses = bounded.all_gather((status, size))
        need = max(s for _, s in statuses) / 2**30
        cost["gathered_gb"] = need
        bad = [s for s, _ in statuses if s != "ready"]
        if bad:
            exchange_fail(bad[0])
        if max_gathered_gb is not None and need > max_gathered_gb:
            exchange_fail(
                f"a reading of the {kind}-sharded model needs a gathered copy of its {need:.2f} GiB of parameters "
                f"on each process, more than max_gathered_gb={max_gathered_gb:g}; readings are skipped. Raise "
                "max_gathered_gb if the memory is there, or read a smaller model"
            )
        assert base is not None and where is not None
        t0 = clock()
        state = gather_full_state(root, where[0])
        made.append(unsharded_adapter(base, state))
        cost["gather_seconds"] = clock() - t0
        return made[0]

    def exchange_fail(why: str) -> None:
        if isinstance(exchange, BoundedExchange):
            exchange.failed = why  # every process saw the same statuses: all fail here, no round needed
        raise ReadingFailed(why)

    namespace = f"{exchange.reading}/lockstep" if isinstance(exchange, BoundedExchange) else ""
    try:
        with lockstep_reading(lockstep, store, host.world_size, host.rank, timeout, namespace):
            yield bounded, (unsharded if kind is not None else resolve), cost
    except ReadingFailed as err:
        if warn is None:
            raise
        warn(
            f"reading-failed:{str(err)[:40]}",
            f"a reading failed on every process together and was skipped ({err}). Training continues.",
        )
    finally:
        made.clear()  # the copy is freed with the reading
