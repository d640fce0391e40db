"""The Lightning distribution a trainer comes from: ``lightning.pytorch`` or ``pytorch_lightning``.

The two distributions are the same code under two names and are often installed side by side, but
their classes are distinct: ``lightning.pytorch``'s ``is_overridden`` rejects a
``pytorch_lightning.LightningModule`` ("Expected a parent"), its ``WandbLogger`` is not the class a
``pytorch_lightning`` script built, and each keeps its own rank-zero state. The monitor asks this
module for the utilities of the trainer it runs in. It never imports ``pytorch_lightning`` itself:
a class from it can only reach the monitor once the user's script has imported it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xattn_lightning.monitoring.messages import Messages

#: the import names of the two distributions, the default first
NAMESPACES: tuple[str, ...] = ("lightning.pytorch", "pytorch_lightning")
_ROOTS = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


def namespace_of(obj: object) -> ModuleType:
    """The Lightning package (``lightning.pytorch`` or ``pytorch_lightning``) whose classes ``obj``'s
    class derives from; ``lightning.pytorch`` when neither.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> namespace_of(Trainer(logger=False, enable_progress_bar=False)).__name__
        'lightning.pytorch'
    """
    for cls in type(obj).__mro__:
        name = _ROOTS.get(cls.__module__.partition(".")[0])
        if name is not None and (cls.__module__ + ".").startswith(name + "."):
            return importlib.import_module(name)
    return importlib.import_module(NAMESPACES[0])


def is_overridden(method: str, pl_module: Any) -> bool:
    """Whether ``pl_module``'s class overrides the ``LightningModule`` hook ``method``, asked of the
    Lightning package the module comes from."""
    return bool(namespace_of(pl_module).utilities.model_helpers.is_overridden(method, pl_module))


def loaded_namespaces() -> list[ModuleType]:
    """The Lightning packages this process has imported (never imports one)."""
    return [sys.modules[name] for name in NAMESPACES if name in sys.modules]


def is_logger_class(logger: object, name: str) -> bool:
    """Whether ``logger`` is an instance of the logger class ``name`` (e.g. ``"WandbLogger"``) of
    either Lightning package that is loaded."""
    for ns in loaded_namespaces():
        cls = getattr(importlib.import_module(ns.__name__ + ".loggers"), name, None)
        if cls is not None and isinstance(logger, cls):
            return True
    return False


# ---------------------------------------------------------------- what a trainer does not say publicly
# Lightning has no public API for these two facts; each private read is held here, says why, and falls
# back to a safe answer when a Lightning version moved it (tests/unit/test_lightning_compat.py runs them).


def steps_logged(trainer: Any) -> int:
    """The step Lightning's own logger connector gives metrics logged now, so that ``xattn/`` scalars land at
    the step of the validation metrics they belong to. Lightning counts it in the private
    ``fit_loop.epoch_loop._batches_that_stepped`` (``trainer.global_step`` counts optimizer steps, which
    differ under gradient accumulation and with several optimizers); falls back to ``global_step``."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return int(trainer.global_step)


def validation_planned(trainer: Any, pl_module: Any) -> bool:
    """Whether this fit will validate: a ``validation_step``, validation batches allowed, and validation data
    given. Whether data was given is only known to the private ``val_loop._data_source``; when a Lightning
    version moved it, validation is assumed (the monitor then warns later, when no validation ran)."""
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    try:
        return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return True


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def training_loader(trainer: Any) -> Any:
    """A fresh training DataLoader (the first, where there are several), before training starts (``None`` when
    it cannot be had): asked of the private ``fit_loop._data_source`` as Lightning asks it (the datamodule's or
    the module's ``train_dataloader()``, or the loaders given to ``fit``), after the datamodule's setup."""
    try:
        source = trainer.fit_loop._data_source
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return None
    return _first_loader(source.dataloader()) if source.is_defined() else None


def first_validation_batch(trainer: Any) -> Any:
    """The first batch of a fresh validation DataLoader, before training starts (``None`` when there is no
    validation data). The loader is asked of the private ``val_loop._data_source`` (the datamodule's or the
    module's ``val_dataloader()``, or the loaders given to ``fit``), as Lightning itself will ask it; its
    iterator is this function's own, so the one validation uses is never touched."""
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
    except AttributeError:  # pragma: no cover - depends on the Lightning version
        return None
    if not source.is_defined():
        return None
    loader = _first_loader(source.dataloader())
    return None if loader is None else next(iter(loader), None)


def sharded_stream(trainer: Any) -> tuple[int, int]:
    """``(stride, offset)`` of this process's validation items in the global order: Lightning's default
    ``DistributedSampler`` (no shuffling) gives rank ``r`` the items ``r, r + world, ...``; ``(1, 0)`` when the
    validation loader is not sharded that way."""
    from torch.utils.data import DistributedSampler

    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
            return int(sampler.num_replicas), int(sampler.rank)
    return 1, 0


class LightningHost:
    """The :class:`~xattn_lightning.monitoring.Host` of a Lightning trainer: collectives through its
    strategy, scalars to every logger, media to its ``WandbLogger``s."""

    def __init__(self, trainer: Any, messages: Messages) -> None:
        self.trainer, self.messages = trainer, messages
        self.world_size, self.rank = trainer.world_size, trainer.global_rank
        #: the module the strategy trains (an FSDP wrapper, a ``fully_shard``-ed module): a sharded one is read
        #: through an unsharded copy (:mod:`xattn_lightning.monitoring.sharded`)
        self.root = getattr(trainer.strategy, "model", None) or getattr(trainer, "lightning_module", None)

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        return obj if self.world_size == 1 else self.trainer.strategy.broadcast(obj, src=0)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``: the strategy gathers tensors only, so one broadcast per process."""
        if self.world_size == 1:
            return [obj]
        return [self.trainer.strategy.broadcast(obj if r == self.rank else None, src=r) for r in range(self.world_size)]

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """To every logger of the trainer (a failing one is warned once)."""
        for logger in self.trainer.loggers:
            try:
                logger.log_metrics(scalars, step=step)
            except Exception as err:
                self.messages.report(err, f"logging scalars to {type(logger).__name__}")

    def media_loggers(self) -> list[Any]:
        """The trainer's ``WandbLogger``s, of either Lightning package."""
        return [lg for lg in self.trainer.loggers if is_logger_class(lg, "WandbLogger")]
