"""The facts the monitor reads from Lightning where no public API gives them (``xattn_lightning._lightning``), checked
in real fits, so that a Lightning release that moves them fails here, not silently in users' runs. CI runs this file
with the newest Lightning; ``.ci/run`` also runs it with the oldest the package supports (see the README)."""

from __future__ import annotations

import csv
import glob

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

from xattn_lightning._lightning import sharded_stream, steps_logged, validation_planned
from xattn_lightning.demo import DemoModule, loaders


class Seen(pl.Callback):
    """Records the facts at the points the monitor reads them."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.planned: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        self.planned.append(validation_planned(trainer, pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(steps_logged(trainer))


class Logged(DemoModule):
    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        self.log("val_probe", 1.0, on_epoch=True)
        return loss


def _fit(tmp_path, module, train, val=None, **kw):
    seen = Seen()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[seen], logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip
    trainer.fit(module, train, val)
    return seen


def test_steps_logged_is_the_step_of_the_validation_metrics(tmp_path):
    train, val = loaders(12, 4, batch_size=4)
    seen = _fit(tmp_path, Logged(), train, val, accumulate_grad_batches=2)  # optimizer steps != batches
    (path,) = glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))
    with open(path) as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("val_probe")]
    assert seen.steps == logged and len(logged) == 2


def test_validation_planned_follows_data_step_and_limits(tmp_path):
    train, val = loaders(8, 4, batch_size=4)
    assert _fit(tmp_path / "a", Logged(), train, val).planned == [True]
    assert _fit(tmp_path / "b", Logged(), train).planned == [False]  # no validation data
    assert _fit(tmp_path / "c", Logged(), train, val, limit_val_batches=0).planned == [False]


def test_sharded_stream_reads_the_distributed_sampler():
    data = list(range(8))

    class T:
        val_dataloaders = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))

    assert sharded_stream(T()) == (2, 1)
    T.val_dataloaders = DataLoader(data)
    assert sharded_stream(T()) == (1, 0)
    T.val_dataloaders = [DataLoader(data, sampler=DistributedSampler(data, num_replicas=3, rank=2, shuffle=True))]
    assert sharded_stream(T()) == (1, 0)  # shuffled shards have no stable global order
