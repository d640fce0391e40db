"""The monitor in both Lightning packages (``lightning.pytorch`` and ``pytorch_lightning``), as the one
line added to a user's script: readings logged, training bit-identical to the same fit without it; a
fault inside any of its hooks never stops training; the batch shapes of public Whisper scripts."""

from __future__ import annotations

import csv
import glob
import importlib
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import clean_exit, speaking_tiny_whisper, tuple_data
from torch.utils.data import DataLoader

import xattn_lightning as xl
from xattn_lightning.callbacks.monitor import XAttnSaliencyMonitor

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def _import(ns: str):
    return pytest.importorskip(ns, reason=f"{ns} is not installed (pip install -e '.[dev]' installs both)")


# ---------------------------------------------------------------- the scripts' modules, in each package
def _module_classes(ns: str) -> dict[str, type]:
    """The LightningModules of the tests, subclassing ``ns``'s ``LightningModule``."""
    pl = importlib.import_module(ns)

    class TrainOnly(pl.LightningModule):
        """A public HF-Whisper script: a model, a training step on (features, labels) tuples, no validation."""

        def __init__(self, lr: float = 1e-2) -> None:
            super().__init__()
            self.model = speaking_tiny_whisper()
            self.lr = lr

        def training_step(self, batch, batch_idx):
            features, labels = batch
            loss = self.model(input_features=features, labels=labels).loss
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class WithValidation(TrainOnly):
        def validation_step(self, batch, batch_idx):
            features, labels = batch
            self.log("val_loss", self.model(input_features=features, labels=labels).loss, sync_dist=True)

    return {"TrainOnly": TrainOnly, "WithValidation": WithValidation}


MODULES: dict[str, dict[str, type]] = {}
for _ns in NAMESPACES:
    try:
        importlib.import_module(_ns)
    except ImportError:  # pragma: no cover - the test that needs it skips with the reason
        continue
    MODULES[_ns] = _module_classes(_ns)
    for _name, _cls in MODULES[_ns].items():  # module-level names, so that ddp_spawn can pickle them
        _cls.__qualname__ = _cls.__name__ = f"{_name}_{_ns.replace('.', '_')}"
        globals()[_cls.__qualname__] = _cls


def cpu_trainer(pl, root: Path, callbacks: list, **kw):
    if kw.get("devices", 1) > 1:
        callbacks = [*callbacks, clean_exit(pl)]
    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2),
        callbacks=callbacks,
        logger=kw.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        default_root_dir=root,
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        **kw,
    )


def _fit(pl, root: Path, module, callbacks: list, train, val=None, ckpt_path=None, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = cpu_trainer(pl, root, callbacks, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    said = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    return trainer, [m for m in said if "pearson_corrected is not logged" not in m]  # 8-mask maps are noise


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs: the monitor changed training"


def _csv_rows(root: Path) -> list[dict[str, str]]:
    (path,) = glob.glob(str(root / "**/metrics.csv"), recursive=True)
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _readings(root: Path) -> list[dict[str, str]]:
    return [r for r in _csv_rows(root) if r.get("xattn/encoder_spes/pearson")]


def _monitor(**kw) -> XAttnSaliencyMonitor:
    kw = {"max_overhead": None, "num_probes": 2, "n_masks": 8, "targets": "labels", **kw}
    return xl.XAttnSaliencyMonitor(**kw)


def _loader(n: int = 8, seed: int = 0, batch_size: int = 2, shuffle: bool = False) -> DataLoader:
    return DataLoader(tuple_data(n, seed), batch_size=batch_size, shuffle=shuffle)


def _as_is(batch):
    return batch


def _batches(batches: list) -> DataLoader:
    """Ready-made batches as a DataLoader (Lightning takes a plain list for a list of loaders)."""
    return DataLoader(batches, batch_size=None, collate_fn=_as_is)


# ---------------------------------------------------------------- the runs, in both packages
@pytest.mark.parametrize("ns", NAMESPACES)
def test_hf_whisper_without_validation_reads_through_probes_and_logs_to_wandb(tmp_path, ns, monkeypatch, caplog):
    """An HF-Whisper module with no validation loop (``probes=``), the monitor the one added line:
    scalars in the CSV logger and heatmaps in the W&B logger of that package; weights unchanged."""
    pl = _import(ns)
    from wandb_reader import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    TrainOnly = MODULES[ns]["TrainOnly"]
    mon = _monitor(probes=_loader(2, seed=1))
    loggers = [pl.loggers.CSVLogger(tmp_path / "csv"), pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True)]
    with_m = TrainOnly()
    with caplog.at_level(logging.INFO):
        _, said = _fit(pl, tmp_path / "a", with_m, [mon], _loader(shuffle=True), logger=loggers)
    assert any("wandb sync" in r.getMessage() for r in caplog.records)  # how to upload the offline run
    import wandb

    wandb.finish()
    without = TrainOnly()
    _fit(pl, tmp_path / "b", without, [], _loader(shuffle=True))
    _same_weights(with_m, without)
    assert not [m for m in said if "token ids" not in m], said  # the tiny model has no tokenizer: only that
    assert [int(r["step"]) for r in _readings(tmp_path / "csv")] == [3, 7]  # each epoch's end
    (run_file,) = glob.glob(str(tmp_path / "wandb/offline-run-*/run-*.wandb"))
    hist = history(run_file)
    assert [h["trainer/global_step"] for h in hist if "xattn/encoder_spes/pearson" in h] == [3, 7]
    assert [h["xattn/heatmaps/count"] for h in hist if h.get("xattn/heatmaps/_type") == "images/separated"] == [2, 2]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_the_same_warnings_in_both_packages(tmp_path, ns):
    """No validation and no probes (it crashed pytorch_lightning fits): the first training utterances are the
    probes, read after each epoch, with nothing to warn about; training unchanged."""
    pl = _import(ns)
    mon = _monitor()
    trainer, said = _fit(pl, tmp_path, MODULES[ns]["TrainOnly"](), [mon], _loader(shuffle=True), max_epochs=1)
    assert [m for m in said if "token ids" not in m] == [] and len(mon.history) == 1
    assert mon.probe_ids == ["probe0", "probe1"]
    without, _ = _fit(pl, tmp_path / "off", MODULES[ns]["TrainOnly"](), [], _loader(shuffle=True), max_epochs=1)
    _same_weights(trainer.lightning_module, without.lightning_module)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_resume_from_a_checkpoint_keeps_the_readings_and_training(tmp_path, ns):
    """One epoch with a checkpoint, then a resume for two more: the probe set and history are carried
    over, the readings continue, and the weights equal the same two fits without the monitor."""
    pl = _import(ns)
    WithValidation = MODULES[ns]["WithValidation"]

    def run(root: Path, monitors: tuple) -> tuple:
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        first = [m for m in (monitors[0], ckpt) if m is not None]
        _fit(pl, root, WithValidation(), first, _loader(shuffle=True), _loader(4, 1), max_epochs=1,
             enable_checkpointing=True)  # fmt: skip
        module = WithValidation()
        logger = pl.loggers.CSVLogger(root / "csv")
        second = [m for m in monitors[1:] if m is not None]
        _, said = _fit(pl, root, module, second, _loader(shuffle=True), _loader(4, 1), max_epochs=3,
                       ckpt_path=root / "ckpt/last.ckpt", logger=logger)  # fmt: skip
        return module, said

    mon1, mon2 = _monitor(), _monitor()
    with_m, said = run(tmp_path / "a", (mon1, mon2))
    without, _ = run(tmp_path / "b", (None, None))
    _same_weights(with_m, without)
    assert mon2.probe_ids == mon1.probe_ids == ["val0", "val1"]
    assert [h["epoch"] for h in mon2.history] == [0, 1, 2]  # one restored, two new
    assert [int(r["step"]) for r in _readings(tmp_path / "a/csv")] == [7, 11]
    assert not [m for m in said if "failed" in m], said


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ns", NAMESPACES)
def test_ddp_two_processes_read_and_leave_training_unchanged(tmp_path, ns):
    """Two CPU processes (ddp_spawn, the package's default distributed sampler): each rank explains its
    share, rank zero logs, the probe set is the single-process one; weights equal DDP without the monitor."""
    pl = _import(ns)
    WithValidation = MODULES[ns]["WithValidation"]
    kw = dict(max_epochs=1, strategy="ddp_spawn", devices=2)
    with_m = WithValidation()
    mon = _monitor(num_probes=3)
    _, said = _fit(pl, tmp_path / "a", with_m, [mon], _loader(shuffle=True), _loader(6, 1),
                   logger=pl.loggers.CSVLogger(tmp_path / "a"), **kw)  # fmt: skip
    without = WithValidation()
    _fit(pl, tmp_path / "b", without, [], _loader(shuffle=True), _loader(6, 1), **kw)
    _same_weights(with_m, without)
    (reading,) = _readings(tmp_path / "a")
    assert float(reading["xattn/num_probes"]) == 3.0 and float(reading["xattn/num_failed"]) == 0.0
    assert math.isfinite(float(reading["xattn/encoder_spes/pearson"]))
    assert not [m for m in said if "failed" in m], said


@pytest.mark.parametrize("ns", NAMESPACES)
def test_openai_whisper_example_in_both_packages(tmp_path, ns):
    """``examples/finetune_openai_whisper.py`` (the ``WhisperModelModule`` style) with its
    ``import lightning.pytorch as pl`` line as the script has it or as ``import pytorch_lightning as pl``."""
    _import(ns)
    pytest.importorskip("whisper", reason="openai-whisper is in the dev extras")
    from helpers import load_example, openai_whisper_checkpoint, tone_manifest

    ex = load_example("finetune_openai_whisper", lightning=ns)
    assert ex.pl.__name__ == ns
    manifest = tone_manifest(tmp_path, n=4)
    argv = ["--model", str(openai_whisper_checkpoint(tmp_path)), "--manifest", str(manifest), "--epochs", "2",
            "--batch-size", "2", "--num-probes", "2", "--n-masks", "8", "--lr", "1e-3",
            "--accelerator", "cpu", "--max-overhead", "none"]  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = ex.main([*argv, "--out", str(tmp_path / "with")])
    said = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    assert not [m for m in said if "pearson_corrected is not logged" not in m], said
    plain = ex.main([*argv, "--out", str(tmp_path / "without"), "--no-monitor"])
    _same_weights(res["module"], plain["module"])
    assert [h["xattn/num_probes"] for h in res["monitor"].history] == [2.0, 2.0]
    assert len(_readings(tmp_path / "with")) == 2


# ---------------------------------------------------------------- a fault in any hook never stops training
HOOKS = [
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_end",
    "on_validation_epoch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_train_epoch_end",
    "state_dict",
    "load_state_dict",
    "on_fit_end",
]


def _fit_and_resume(pl, root: Path, monitor_factory) -> tuple:
    """One epoch saving a checkpoint, then a resume for a second: every hook of the monitor runs."""
    WithValidation = MODULES[pl.__name__]["WithValidation"]
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    mon = monitor_factory()
    first = [c for c in (mon, ckpt) if c is not None]
    _, said = _fit(pl, root, WithValidation(), first, _loader(shuffle=True), _loader(2, 1), max_epochs=1,
                   enable_checkpointing=True)  # fmt: skip
    module, mon2 = WithValidation(), monitor_factory()
    _, said2 = _fit(pl, root, module, [mon2] if mon2 else [], _loader(shuffle=True), _loader(2, 1), max_epochs=2,
                    ckpt_path=root / "ckpt/last.ckpt")  # fmt: skip
    return module, (said, said2), mon2


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def _reference_weights(pl, root: Path) -> torch.nn.Module:
    if pl.__name__ not in _REFERENCE:
        module, _, _ = _fit_and_resume(pl, root, lambda: None)
        _REFERENCE[pl.__name__] = module
    return _REFERENCE[pl.__name__]


def _inject_fault(monkeypatch, hook: str, message: str) -> None:
    """A fault at the end of the body of the monitor's hook ``hook`` (inside the guard every hook runs under)."""
    import contextlib

    from xattn_lightning.monitoring.messages import Messages

    real = Messages.guard

    @contextlib.contextmanager
    def faulty(self, name):
        with real(self, name):
            yield
            if name == hook:
                raise RuntimeError(message)

    monkeypatch.setattr(Messages, "guard", faulty)


@pytest.mark.parametrize(
    "ns,hook",
    [("lightning.pytorch", h) for h in HOOKS] + [("pytorch_lightning", h) for h in ("on_fit_start", "state_dict")],
)
def test_a_fault_in_each_hook_is_warned_once_and_training_goes_on(tmp_path, monkeypatch, ns, hook):
    pl = _import(ns)

    _inject_fault(monkeypatch, hook, f"injected into {hook}")
    module, said, mon = _fit_and_resume(pl, tmp_path / "faulty", lambda: _monitor(num_probes=1))
    _same_weights(module, _reference_weights(pl, tmp_path / "reference"))
    told = [[m for m in fit if f"injected into {hook}" in m] for fit in said]
    assert [len(t) <= 1 for t in told] == [True, True] and any(told), said  # once a fit, however often it ran
    told = [m for t in told for m in t]
    assert f"its {hook} hook failed" in told[0] and "Training continues" in told[0] and "on_error='raise'" in told[0]
    if hook not in ("on_validation_batch_end", "on_validation_epoch_end"):  # where the probes and readings come from
        assert mon.history, "a fault elsewhere must not cost the readings"


@pytest.mark.parametrize("ns", NAMESPACES)
def test_on_error_raise_lets_a_hook_fault_through(tmp_path, monkeypatch, ns):
    pl = _import(ns)

    _inject_fault(monkeypatch, "on_fit_start", "injected")
    from test_scripts import FakeTokenizer  # (on_error="raise" makes a missing tokenizer an error too)

    with pytest.raises(RuntimeError, match="injected"):
        monitor = _monitor(on_error="raise", tokenizer=FakeTokenizer())
        _fit(pl, tmp_path, MODULES[ns]["TrainOnly"](), [monitor], _loader(), max_epochs=1)


# ---------------------------------------------------------------- batch shapes of public scripts, no batch_fn
def _triples(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """openai-whisper repositories' ``(mel, y_in, y_out)``: the decoder input, and the labels shifted
    by one token and padded with -100 (batches of 2 with different text lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n // 2):
        mel = torch.full((2, 80, 100), -0.5)
        mel[:, :, :70] = torch.randn(2, 80, 70, generator=g)
        lengths = (3 + b, 5 + b)
        y_in = torch.full((2, max(lengths) + 2), 50256)  # padded with EOT
        y_out = torch.full((2, max(lengths) + 2), -100)
        for i, k in enumerate(lengths):
            text = [50257, 50362, *torch.randint(300, 900, (k,), generator=g).tolist()]  # SOT, no timestamps
            y_in[i, : len(text)] = torch.tensor(text)
            y_out[i, : len(text)] = torch.tensor([*text[1:], 50256])
        out.append((mel, y_in, y_out))
    return out


def _feature_text_pairs(n: int = 4, seed: int = 0) -> list:
    """``(BatchFeature, BatchEncoding)``: a feature extractor's output and a tokenizer's, as pairs of dicts."""
    from transformers import BatchEncoding, BatchFeature

    out = []
    for b in range(n // 2):
        feats, labels = tuple_data(2, seed + b)[:]
        text = BatchEncoding({"labels": labels, "attention_mask": torch.ones_like(labels)})
        out.append((BatchFeature({"input_features": feats}), text))
    return out


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("shape", ["openai-whisper (mel, y_in, y_out)", "(BatchFeature, BatchEncoding)"])
def test_batch_shapes_of_public_scripts_need_no_batch_fn(tmp_path, ns, shape):
    pl = _import(ns)
    if shape.startswith("openai"):
        pytest.importorskip("whisper", reason="openai-whisper is in the dev extras")
        from helpers import random_whisper

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = random_whisper(n_audio_ctx=50)
                self.loss = torch.nn.CrossEntropyLoss(ignore_index=-100)

            def _loss(self, batch):
                mel, y_in, y_out = batch
                logits = self.model(mel, y_in)
                return self.loss(logits.transpose(1, 2), y_out)

            def training_step(self, batch, batch_idx):
                return self._loss(batch)

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", self._loss(batch))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=1e-3)

        batches = _triples()
    else:

        class Module(MODULES[ns]["TrainOnly"]):
            def training_step(self, batch, batch_idx):
                return self.model(input_features=batch[0]["input_features"], labels=batch[1]["labels"]).loss

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", self.training_step(batch, batch_idx))

        batches = _feature_text_pairs()
    mon = _monitor(num_probes=3, targets="generate", max_new_tokens=4)
    _, said = _fit(pl, tmp_path, Module(), [mon], _batches(batches), _batches(batches), max_epochs=1)
    assert not [m for m in said if "batch_fn" in m or "failed" in m], said
    assert len(mon.history) == 1 and mon.history[0]["xattn/num_probes"] == 3.0
    assert mon.history[0]["xattn/num_failed"] == 0.0


def test_an_ambiguous_batch_is_warned_once_with_the_batch_fn_line(tmp_path):
    """Three tensors that are not openai-whisper's layout: one warning (not one per batch) that names
    what the batch holds and the line to write."""
    pl = _import("lightning.pytorch")

    class Module(MODULES["lightning.pytorch"]["WithValidation"]):
        def training_step(self, batch, batch_idx):
            return self.model(input_features=batch[0], labels=batch[1]).loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

    data = [(f, y, y.flip(1)) for f, y in _loader(8)]
    _, said = _fit(pl, tmp_path, Module(), [_monitor()], _batches(data), _batches(data), max_epochs=2)
    told = [m for m in said if "batch_keys=" in m]
    assert len(told) == 1, said
    assert "Tensor[2, 16, 200] float32 at 0" in told[0] and "ambiguous" in told[0]
    assert 'batch_keys={"input_features": "0", "labels": "2"}' in told[0] and "batch_fn=" in told[0]


# ---------------------------------------------------------------- one step everywhere
@pytest.mark.parametrize("ns", NAMESPACES)
def test_console_and_heatmap_titles_show_the_step_the_scalars_were_logged_at(tmp_path, ns, monkeypatch, caplog):
    import xattn_lightning.viz as viz

    pl = _import(ns)
    monkeypatch.setenv("WANDB_MODE", "offline")
    titles: list[str] = []
    real = viz.heatmap_figure

    def spy(*args, **kwargs):
        titles.append(kwargs["title"])
        return real(*args, **kwargs)

    monkeypatch.setattr(viz, "heatmap_figure", spy)
    loggers = [pl.loggers.CSVLogger(tmp_path / "csv"), pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True)]
    with caplog.at_level(logging.INFO):
        _fit(pl, tmp_path, MODULES[ns]["WithValidation"](), [_monitor(max_figures=1)], _loader(), _loader(2, 1),
             logger=loggers)  # fmt: skip
    import wandb

    wandb.finish()
    steps = [int(r["step"]) for r in _readings(tmp_path / "csv")]
    assert steps == [3, 7]  # the global step is 4 and 8 there
    assert titles == [f"val0 @ step {s}" for s in steps]
    said = [r.getMessage() for r in caplog.records if "best head" in r.getMessage()]
    assert [m.split("reading at step ")[1].split(":")[0] for m in said] == ["3", "7"], said
