"""Issue 6: the monitor never harms training, survives injected faults, rejects bad input clearly.

Each test is one row of the reliability table in docs/reliability.md.
"""

import gc
import glob
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import cpu_trainer, tiny_whisper, whisper_batch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import xattn_lightning as xl
from xattn_lightning.demo import DemoModule, loaders
from xattn_lightning.testing import TinyS2T


# ---------------------------------------------------------------------------- fixtures
class WhisperData(Dataset):
    """Random features in the tiny Whisper's 2-s window, labels of ordinary tokens."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            frames = 40 + 7 * i
            x = torch.full((16, 200), -0.5)
            x[:, :frames] = torch.randn(16, frames, generator=g)
            mask = torch.zeros(200, dtype=torch.long)
            mask[:frames] = 1
            labels = torch.cat([torch.tensor([52]), torch.randint(0, 50, (4,), generator=g), torch.tensor([50])])
            self.items.append((x, mask, labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def whisper_collate(items):
    return {
        "input_features": torch.stack([x for x, _, _ in items]),
        "attention_mask": torch.stack([m for _, m, _ in items]),
        "labels": torch.stack([y for _, _, y in items]),
    }


class WhisperLit(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = tiny_whisper(seed=0)
        self.model.config.dropout = 0.1  # dropout on: the monitor must not consume the RNG
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.1
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(input_features=batch["input_features"], labels=batch["labels"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_features=batch["input_features"], labels=batch["labels"]).loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


def _whisper_loaders():
    return (
        DataLoader(WhisperData(8, seed=0), batch_size=2, shuffle=True, collate_fn=whisper_collate),
        DataLoader(WhisperData(4, seed=1), batch_size=2, collate_fn=whisper_collate),
    )


class DemoWithScheduler(DemoModule):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]




def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _module_state(model: nn.Module):
    cfg = getattr(getattr(model, "model", model), "config", None)
    return (
        getattr(cfg, "_attn_implementation", None),
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        _hooks(model),
    )


def _run(kind: str, tmp_path, monitor, **kw):
    pl.seed_everything(0)
    if kind == "whisper":
        module, (tr, va) = WhisperLit(), _whisper_loaders()
    else:
        module, (tr, va) = DemoWithScheduler(lr=3e-3), loaders(24, 4, batch_size=4)
    before = _module_state(module)
    trainer = cpu_trainer(tmp_path, [monitor] if monitor else [], **kw)
    trainer.fit(module, tr, va)
    return module, trainer, before


# ---------------------------------------------------------------------------- 1. non-interference
@pytest.mark.parametrize(
    "kind,accumulate,precision",
    [
        ("custom", 1, "32-true"),
        ("custom", 2, "32-true"),
        ("custom", 2, "bf16-mixed"),
        ("whisper", 1, "32-true"),
        ("whisper", 2, "32-true"),
        ("whisper", 2, "bf16-mixed"),
    ],
)
def test_bit_identical_training_with_and_without_monitor(tmp_path, kind, accumulate, precision):
    methods = ("spes", "encoder_spes", "saliency")
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=methods, n_masks=8, targets="labels", saliency_options={"n_steps": 2}
    )
    kw = dict(accumulate_grad_batches=accumulate, precision=precision)
    with_m, t1, before = _run(kind, tmp_path / "a", mon, **kw)
    rng_with = (torch.get_rng_state(), torch.initial_seed())
    without, t2, _ = _run(kind, tmp_path / "b", None, **kw)
    rng_without = (torch.get_rng_state(), torch.initial_seed())
    assert len(mon.history) == 2 and mon.history[-1]["xattn/num_failed"] == 0.0  # the monitor really ran
    for (n, a), (_, b) in zip(with_m.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), n
    for pa, pb in zip(with_m.parameters(), without.parameters()):
        assert (pa.grad is None and pb.grad is None) or torch.equal(pa.grad, pb.grad)
    o1, o2 = t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    assert o1["param_groups"] == o2["param_groups"]  # learning rates after the schedule included
    for k in o1["state"]:
        for name, v in o1["state"][k].items():
            assert torch.equal(v, o2["state"][k][name]), name
    assert t1.lr_scheduler_configs[0].scheduler.state_dict() == t2.lr_scheduler_configs[0].scheduler.state_dict()
    assert (t1.global_step, t1.current_epoch) == (t2.global_step, t2.current_epoch)
    assert torch.equal(rng_with[0], rng_without[0])
    # nothing the monitor touched survives: hooks, attention implementation, modes, requires_grad
    after = _module_state(with_m)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    assert after[1] == [m.training for m in without.modules()]


def test_frozen_encoder_and_train_mode_and_checkpointing_survive(tmp_path):
    module = WhisperLit()
    module.model.model.encoder.requires_grad_(False)  # a frozen encoder
    module.model.gradient_checkpointing_enable()
    module.model.train()  # left in train mode, dropout on
    _, va = _whisper_loaders()
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("saliency", "encoder_saliency"), targets="labels", saliency_options={"n_steps": 2}
    )
    trainer = cpu_trainer(tmp_path, [mon], max_epochs=1)
    trainer.validate(module, va)
    state = _module_state(module)
    mon.run(trainer, module)
    first = mon.history[-1]["xattn/saliency/pearson"]
    mon.run(trainer, module)
    assert mon.history[-1]["xattn/saliency/pearson"] == first  # eval inside: dropout does not change the maps
    assert _module_state(module) == state
    assert module.model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in module.model.model.encoder.parameters())
    assert all(p.grad is None for p in module.parameters())  # no gradient left on the weights


def test_memory_returns_to_its_level(tmp_path):
    import matplotlib.pyplot as plt

    model = DemoModule()
    _, va = loaders(8, 4, batch_size=4)
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("spes", "encoder_spes"), n_masks=8, targets="labels"
    )
    trainer = cpu_trainer(tmp_path, [mon], max_epochs=1)
    trainer.validate(model, va)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    mon.run(trainer, model)
    level = live_tensors()
    for _ in range(3):
        mon.run(trainer, model)
    assert live_tensors() <= level  # later runs replace, never accumulate
    assert plt.get_fignums() == []  # no figure left open


# ---------------------------------------------------------------------------- 2. fault tolerance
class FailingLogger(Logger):
    """A logger that fails the way W&B or a full disk would, but only for the monitor's keys."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc
        self.rows: list[dict] = []

    @property
    def name(self):
        return "failing"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("xattn/") for k in metrics):
            raise self.exc
        self.rows.append(dict(metrics))


def _fit_demo(tmp_path, monitor, logger=False, max_epochs=2):
    pl.seed_everything(0)
    tr, va = loaders(24, 4, batch_size=4)
    trainer = cpu_trainer(tmp_path, [monitor], logger=logger, max_epochs=max_epochs)
    trainer.fit(DemoModule(), tr, va)
    return trainer


def _csv_rows(tmp_path) -> list[dict]:
    import csv

    (path,) = glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def _warnings_matching(record, text: str) -> list:
    return [w for w in record if text in str(w.message)]


@pytest.mark.parametrize(
    "exc,cause",
    [
        (ConnectionError("W&B unreachable"), "W&B unreachable"),
        (OSError(28, "No space left on device"), "No space left on device"),
    ],
)
def test_failing_logger_is_warned_once_and_other_loggers_still_get_metrics(tmp_path, exc, cause):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    csv = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = _fit_demo(tmp_path, mon, [FailingLogger(exc), csv])
    assert trainer.current_epoch == 2
    assert len(_warnings_matching(rec, cause)) == 1  # reported once, with the cause
    rows = [r for r in _csv_rows(tmp_path) if "xattn/encoder_spes/pearson" in r]
    assert len(rows) == 2  # the metrics computed are still logged to the logger that works


def test_wandb_media_failing_does_not_stop_training(tmp_path, monkeypatch):
    """W&B accepts Lightning's own metrics but fails on everything the monitor sends (its service
    failing to start when media is first uploaded): warned, training continues, CSV still has the numbers."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")

    def broken(*a, **k):
        raise RuntimeError("wandb.init() failed: network unreachable")

    monkeypatch.setattr(wandb, "Image", broken)

    class BrokenWandb(WandbLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("xattn/") for k in metrics):
                broken()
            super().log_metrics(metrics, step)

    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    csv = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = _fit_demo(tmp_path, mon, [BrokenWandb(save_dir=str(tmp_path), offline=True), csv])
    wandb.finish()
    assert trainer.current_epoch == 2
    msgs = _warnings_matching(rec, "network unreachable")
    assert len(msgs) == 2  # scalars and media: each cause once, not once per epoch
    assert len([r for r in _csv_rows(tmp_path) if "xattn/encoder_spes/pearson" in r]) == 2


@pytest.mark.parametrize("fault", ["oom", "nan_maps", "bad_probe"])
def test_injected_faults_skip_and_training_continues(tmp_path, monkeypatch, fault):
    import xattn_lightning.saliency.methods as sal  # where the method bodies call the mask loops

    csv = CSVLogger(tmp_path)
    if fault == "oom":

        def boom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        monkeypatch.setattr(sal, "spes_encoder", boom)
        cause = "out of memory"
    elif fault == "nan_maps":
        real = sal.spes_encoder

        def nan_maps(*a, **k):
            r = real(*a, **k)
            r.map = r.map * float("nan")
            return r

        monkeypatch.setattr(sal, "spes_encoder", nan_maps)
        cause = "NaN/inf"
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    batch_fn = None
    if fault == "bad_probe":
        # the second probe has NaN features: it fails, the first is still explained and logged
        def batch_fn(batch):
            batch = dict(batch)
            x = batch["input_features"].clone()
            x[1, 0, 0] = float("nan")
            batch["input_features"] = x
            return batch

        mon = xl.XAttnSaliencyMonitor(
            max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels", batch_fn=batch_fn
        )
        cause = "NaN/inf"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = _fit_demo(tmp_path, mon, csv)
    assert trainer.current_epoch == 2
    assert len(_warnings_matching(rec, cause)) == 1  # the same cause is reported once, not every epoch
    logged = [r for r in _csv_rows(tmp_path) if "xattn/num_failed" in r] if mon.history else []
    if fault == "bad_probe":
        assert [r["xattn/num_probes"] for r in logged] == [1.0, 1.0]
        assert all(r["xattn/num_failed"] == 1.0 and math.isfinite(r["xattn/encoder_spes/pearson"]) for r in logged)
    else:
        assert logged == [] and mon.history == []  # run skipped, nothing half-logged
    mon_raise = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=2,
        methods=("encoder_spes",),
        n_masks=8,
        targets="labels",
        on_error="raise",
        batch_fn=batch_fn,
    )
    with pytest.raises((xl.XAttnError, torch.OutOfMemoryError, RuntimeError)):
        _fit_demo(tmp_path / "raise", mon_raise)


def test_nan_metric_is_never_logged(tmp_path):
    # constant saliency (an undefined ρ): the scalar is left out, never logged as NaN
    from helpers import scored

    from xattn_lightning.summary import summarize

    scalars = summarize([scored(float("nan"), "spes")], ("spes",), ("pearson",)).scalars
    assert math.isnan(scalars["spes/pearson"])
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=1, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    model = DemoModule()
    _, va = loaders(4, 4, batch_size=4)
    trainer = cpu_trainer(tmp_path, [mon], logger=CSVLogger(tmp_path), max_epochs=1)
    trainer.validate(model, va)
    import xattn_lightning.summary as mm

    orig = mm.summarize
    import dataclasses

    mm.summarize = lambda *a, **k: dataclasses.replace(orig(*a, **k), scalars={"encoder_spes/pearson": float("nan")})
    try:
        mon.run(trainer, model)
    finally:
        mm.summarize = orig
    assert "xattn/encoder_spes/pearson" not in mon.history[-1]
    assert all(math.isfinite(v) for k, v in mon.history[-1].items() if k.startswith("xattn/"))


# ---------------------------------------------------------------------------- 3. bad input
def test_bad_input_rows():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    # empty utterance
    with pytest.raises(xl.XAttnError, match="no valid frames"):
        xl.explain(model, {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}, targets=[[51, 5, 50]])
    # 1-frame utterance: explained (one encoder frame), not a crash
    (e,) = xl.explain(model, whisper_batch(model, (1,)), targets=[[51, 5, 6, 50]], methods=("encoder_spes",), n_masks=4)
    assert e.num_frames == 1 and e.num_encoder_frames == 1
    # all-zero audio features (Whisper: a constant floor) -> works; NaN/inf -> clear error
    zero = {**batch, "input_features": torch.zeros_like(batch["input_features"])}
    (e,) = xl.explain(model, zero, targets=[[51, 5, 50]], methods=("encoder_spes",), n_masks=4)
    assert torch.isfinite(e.saliency["encoder_spes"]).all()
    for bad in (float("nan"), float("inf")):
        x = batch["input_features"].clone()
        x[0, 0, 0] = bad
        with pytest.raises(xl.XAttnError, match="NaN/inf"):
            xl.explain(model, {**batch, "input_features": x}, targets=[[51, 5, 50]])
    # only special tokens; longer than the decoder allows; missing keys
    with pytest.raises(xl.XAttnError, match="only special tokens"):
        xl.explain(model, batch, targets=[[51, 52, 50]])
    with pytest.raises(xl.XAttnError, match="at most 24"):
        xl.explain(model, batch, targets=[[51] + [5] * 40 + [50]])
    with pytest.raises(xl.XAttnError, match="no features the model takes"):
        xl.explain(model, {"wave": torch.randn(1, 100)}, targets=[[51, 5, 50]])


def test_probe_set_smaller_than_num_probes_is_warned_and_used(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=50, methods=("encoder_spes",), n_masks=4, targets="labels"
    )
    with pytest.warns(UserWarning, match="only 4 probe utterances"):
        _fit_small(tmp_path, mon)
    assert mon.history[-1]["xattn/num_probes"] == 4.0


def _fit_small(tmp_path, mon):
    pl.seed_everything(0)
    tr, va = loaders(8, 4, batch_size=4)
    cpu_trainer(tmp_path, [mon], max_epochs=1).fit(DemoModule(), tr, va)


def test_attention_kernel_without_weights_and_half_precision():
    # SDPA kernels return no weights: switched to eager for the call and back
    model = tiny_whisper(attn="sdpa")
    (e,) = xl.explain(model, whisper_batch(model, (30,)), targets=[[51, 5, 6, 50]])
    assert e.cross_attention.shape[:2] == (2, 4) and model.config._attn_implementation == "sdpa"
    # a half-precision model: explained in its own dtype, maps returned in float32
    half = tiny_whisper().to(torch.bfloat16)
    (e,) = xl.explain(
        half,
        whisper_batch(half, (30,)),
        targets=[[51, 5, 6, 50]],
        methods=("encoder_spes", "saliency"),
        n_masks=8,
        n_steps=2,
    )
    assert e.saliency["saliency"].dtype == torch.float32 and torch.isfinite(e.saliency["encoder_spes"]).all()
    assert next(half.parameters()).dtype == torch.bfloat16


def test_custom_model_without_cross_attention_module_names():
    with pytest.raises(xl.XAttnError, match="No module matches"):
        xl.HookAdapter(TinyS2T(), encoder="encoder", cross_attention="decoder.layers.*.cross_attn")


# ---------------------------------------------------------------------------- 4. resume and DDP faults
def test_resume_continues_wandb_steps_without_duplicates(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger
    from wandb_reader import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    tr, va = loaders(24, 4, batch_size=4)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=4, targets="labels"
    )
    pl.seed_everything(0)
    t1 = pl.Trainer(
        max_epochs=2,
        callbacks=[mon, ck],
        logger=WandbLogger(save_dir=str(tmp_path / "w1"), offline=True),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    t1.fit(DemoModule(), tr, va)
    wandb.finish()
    mon2 = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=4, targets="labels"
    )
    t2 = pl.Trainer(
        max_epochs=4,
        callbacks=[mon2],
        logger=WandbLogger(save_dir=str(tmp_path / "w2"), offline=True),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    t2.fit(DemoModule(), tr, va, ckpt_path=tmp_path / "ck/last.ckpt")
    wandb.finish()
    steps_before = [h["step"] for h in mon.history]
    assert [h["step"] for h in mon2.history][:2] == steps_before  # history continues
    (f2,) = glob.glob(str(tmp_path / "w2/wandb/offline-run-*/run-*.wandb"))
    rows = history(f2)
    logged = [r["trainer/global_step"] for r in rows if "xattn/encoder_spes/pearson" in r]
    assert logged, f"no xattn rows among the {len(rows)} history rows of {f2}: {[sorted(r)[:4] for r in rows]}"
    assert logged == sorted(set(logged)) and min(logged) > max(steps_before)  # only new steps, in order


def _fail_on_rank_one(pl_module):
    if pl_module.global_rank == 1:
        raise RuntimeError("injected fault on rank 1")
    return pl_module.xattn_adapter


@pytest.mark.timeout(300)
def test_ddp_fault_on_one_rank_does_not_deadlock(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=4,
        methods=("encoder_spes",),
        n_masks=4,
        targets="labels",
        model_fn=_fail_on_rank_one,
    )
    pl.seed_everything(0)
    tr, va = loaders(16, 8, batch_size=4)
    trainer = cpu_trainer(tmp_path, [mon], CSVLogger(tmp_path), devices=2, use_distributed_sampler=False)
    trainer.fit(DemoModule(), tr, va)  # returns: no deadlock
    import csv

    (path,) = glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))
    with open(path) as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("xattn/num_failed")]
    assert len(logged) == 2
    # rank 0's half of the probes is still explained and logged; rank 1's failure is counted
    assert all(float(r["xattn/num_probes"]) == 2.0 and float(r["xattn/num_failed"]) == 1.0 for r in logged)
