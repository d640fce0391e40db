import glob
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import cpu_trainer, fit_demo, read_csv
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb_reader import history

import xattn_lightning as xl
from xattn_lightning.demo import DemoModule, loaders


def test_csv_logger_gets_scalars(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=3, methods=("encoder_spes", "spes"), n_masks=24, targets="labels"
    )
    fit_demo(tmp_path, mon, CSVLogger(tmp_path))
    rows = read_csv(glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))[0])
    xrows = [r for r in rows if r.get("xattn/spes/pearson")]
    # after each epoch's validation, at the step Lightning gives that validation's own metrics
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    assert [int(r["step"]) for r in xrows] == val_steps == [5, 11]
    for r in xrows:
        for key in (
            "xattn/spes/pearson",
            "xattn/encoder_spes/spearman",
            "xattn/context_mixing_gap",
            "xattn/spes/pearson_layer1",
            "xattn/spes/pearson_best_head",
            "xattn/spes/coverage",
            "xattn/seconds",
        ):
            assert math.isfinite(float(r[key])), key
        assert -1 <= float(r["xattn/spes/pearson"]) <= 1
        # split-half reliability of the 24-mask maps, and ρ corrected for their noise (left out when undefined)
        assert r["xattn/spes/reliability"] == "" or 0 < float(r["xattn/spes/reliability"]) <= 1
        assert "xattn/encoder_spes/pearson_corrected" in r
    assert mon.probe_ids == ["syn0000", "syn0001", "syn0002"]
    ranking = mon.head_ranking["spes"]
    assert len(ranking) == 4 and ranking[0][2] >= ranking[-1][2]


def test_layers_heads_select_the_headline_aggregation(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=16, targets="labels", layers="last"
    )
    fit_demo(tmp_path, mon, max_epochs=1)
    h = mon.history[-1]
    assert h["xattn/encoder_spes/pearson"] == pytest.approx(h["xattn/encoder_spes/pearson_layer1"])
    mon2 = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=16, targets="labels", layers=[0], heads=[1]
    )
    fit_demo(tmp_path, mon2, max_epochs=1)
    e = mon2.last_explanations[0]
    assert e.agreement("encoder_spes", layers=[0], heads=[1]) == pytest.approx(e.agreement_grid("encoder_spes")[0, 1])
    with pytest.raises(xl.XAttnError, match="last_k"):
        xl.XAttnSaliencyMonitor(max_overhead=None, layers="last_x")


def test_max_seconds_calibrates_the_mask_count_once_then_freezes_it(tmp_path, monkeypatch):
    mon = xl.XAttnSaliencyMonitor(
        num_probes=2, methods=("spes", "encoder_spes"), n_masks=100000, max_seconds=0.5, targets="labels"
    )
    fit_demo(tmp_path, mon, max_epochs=2)
    n = mon.instrument.reader.masks.frozen
    assert 8 <= n < 100000 and n % 8 == 0
    for h in mon.history:  # every reading of the run uses the calibrated count, for every method
        assert h["xattn/spes/n_masks"] == h["xattn/encoder_spes/n_masks"] == float(n)
    assert mon.state_dict()["n_masks_frozen"] == n
    resumed = xl.XAttnSaliencyMonitor(
        num_probes=2, methods=("encoder_spes",), n_masks=100000, max_seconds=0.5, targets="labels"
    )
    resumed.load_state_dict(mon.state_dict())
    monkeypatch.setattr(resumed.instrument.reader, "_calibrate", lambda *a, **k: pytest.fail("a resume must not recalibrate"))
    fit_demo(tmp_path / "r", resumed, max_epochs=1)
    assert resumed.history[-1]["xattn/encoder_spes/n_masks"] == float(n)


class FakeClock:
    """Seconds that pass only when told: training batches and monitor readings cost what the test says."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fit_on_clock(tmp_path, max_overhead, monitor_cost):
    clock = FakeClock()
    mon = xl.XAttnSaliencyMonitor(
        num_probes=2, methods=("encoder_spes",), n_masks=24, targets="labels", max_overhead=max_overhead
    )
    mon.clock = clock
    mon.said = []  # what the monitor says (information, not warnings)
    mon.instrument.messages.say = mon.said.append
    real_run = mon.run

    def run(*a, **k):
        clock.t += monitor_cost  # a slow (or busy) machine: the reading takes long
        return real_run(*a, **k)

    mon.run = run

    class Batches(pl.Callback):
        def on_train_batch_end(self, *a):
            clock.t += 1.0  # one second per training batch

    pl.seed_everything(0)
    tr, va = loaders(48, 6, batch_size=8)
    trainer = cpu_trainer(tmp_path, [mon, Batches()], max_epochs=4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(DemoModule(lr=0.0), tr, va)  # lr=0: every reading explains the same weights
    return mon, [str(w.message) for w in rec if "max_overhead" in str(w.message)]


def test_max_overhead_thins_readings_and_never_changes_them(tmp_path):
    fast, warned_fast = _fit_on_clock(tmp_path / "fast", 0.1, monitor_cost=0.1)
    slow, warned_slow = _fit_on_clock(tmp_path / "slow", 0.1, monitor_cost=30.0)
    assert [h["step"] for h in fast.history] == [6, 12, 18, 24] and warned_fast == []
    # 30 s against 6 s of training per epoch: later readings wait until training has caught up
    assert [h["step"] for h in slow.history] == [6] and slow.skipped_steps == [12, 18, 24]
    assert len(warned_slow) == 2 and "thinned" in warned_slow[0]  # when it starts, and once at the end
    end = warned_slow[1]  # the run's end: what was not taken and why, and what the readings cost
    assert "3 of the 4 readings due in this run were not taken: 3 because the monitor was over" in end
    assert "took 1 reading(s) in 30 s against 24 s of training" in end and "max_overhead=0.1 thinned 3 due" in end
    assert "took 4 reading(s)" in fast.said[-1] and "thinned 0 due" in fast.said[-1]  # nothing missed: information
    # what one reading measures does not depend on the machine: the same numbers, the same mask count
    for key, value in fast.history[0].items():
        if key not in ("xattn/seconds",):
            assert slow.history[0][key] == value, key
    assert fast.history[0]["xattn/encoder_spes/n_masks"] == 24.0
    assert all(h["xattn/encoder_spes/pearson"] == fast.history[0]["xattn/encoder_spes/pearson"] for h in fast.history)
    with pytest.raises(xl.XAttnError, match="max_overhead"):
        xl.XAttnSaliencyMonitor(max_overhead=0)


def test_wandb_logger_helper_offline_and_sync_hint(tmp_path, monkeypatch, caplog):
    import logging

    from xattn_lightning.loggers import wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the helper must not rely on the mode being set
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = wandb_logger(save_dir=tmp_path, project="xl-test")
    assert logger._offline
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=1, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    with caplog.at_level(logging.INFO):
        fit_demo(tmp_path, mon, logger, max_epochs=1)
    import wandb

    wandb.finish()
    assert any("wandb sync" in r.getMessage() and "offline-run-" in r.getMessage() for r in caplog.records)


def test_wandb_offline_run_readback(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=16, targets="labels"
    )
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="xl-test")
    fit_demo(tmp_path, mon, logger)
    import wandb

    wandb.finish()
    (run_file,) = glob.glob(str(tmp_path / "wandb/offline-run-*/run-*.wandb"))
    hist = history(run_file)
    scal = [h for h in hist if "xattn/encoder_spes/pearson" in h]
    val_steps = [h["trainer/global_step"] for h in hist if "val_loss" in h]
    assert [h["trainer/global_step"] for h in scal] == val_steps == [5, 11]  # beside the validation they follow
    assert all(math.isfinite(h["xattn/encoder_spes/pearson"]) for h in scal)
    imgs = [h for h in hist if h.get("xattn/heatmaps/_type") == "images/separated"]
    assert [h["xattn/heatmaps/count"] for h in imgs] == [2, 2]
    assert [h["trainer/global_step"] for h in imgs] == [5, 11]
    assert any(h.get("xattn/head_grid/_type") == "images/separated" for h in hist)
    tables = [h for h in hist if h.get("xattn/probes/_type") == "table-file"]
    assert [h["xattn/probes/nrows"] for h in tables] == [2, 2]
    assert any(h.get("xattn/head_ranking/_type") == "table-file" for h in hist)
    steps = [h["_step"] for h in hist]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_training_is_bit_identical_with_and_without_monitor(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("spes", "encoder_spes", "saliency"), n_masks=16, targets="labels"
    )
    with_m, t1 = fit_demo(tmp_path / "a", mon, accumulate_grad_batches=2)
    without, t2 = fit_demo(tmp_path / "b", None, accumulate_grad_batches=2)
    for (n, a), (_, b) in zip(with_m.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), n
    o1, o2 = t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    for k in o1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o1["state"][k][name], o2["state"][k][name])
    assert t1.global_step == t2.global_step
    assert len(mon.history) == 2


def test_rng_streams_untouched(tmp_path):
    model = DemoModule()
    _, va = loaders(8, 4, batch_size=4)
    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, methods=("spes",), n_masks=8, targets="generate")
    trainer = cpu_trainer(tmp_path, [mon], max_epochs=1)
    trainer.validate(model, va)  # collects probes
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mon.run(trainer, model)
    assert torch.equal(before, torch.get_rng_state())


def test_resume_keeps_probe_set_and_history(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    pl.seed_everything(0)
    tr, va = loaders(48, 6, batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[mon, ckpt_cb],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(DemoModule(), tr, va)
    state = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["callbacks"]
    (key,) = [k for k in state if "XAttnSaliencyMonitor" in k]
    assert state[key]["probe_ids"] == ["syn0000", "syn0001"]
    # resume with a validation set in a different order: the stored positions are kept
    mon2 = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels"
    )
    trainer2 = pl.Trainer(
        max_epochs=3,
        callbacks=[mon2],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer2.fit(DemoModule(), tr, va, ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert mon2.probe_ids == ["syn0000", "syn0001"]
    steps = [h["step"] for h in mon2.history]
    assert steps == sorted(set(steps)) and len(steps) == 3  # one restored + two new, none repeated


def test_sanity_check_is_skipped_and_schedule(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, every_n_epochs=2, num_probes=1, methods=("encoder_spes",), n_masks=4
    )
    fit_demo(tmp_path, mon, max_epochs=4, num_sanity_val_steps=2)
    assert [h["epoch"] for h in mon.history] == [1, 3]


def test_monitor_argument_errors():
    with pytest.raises(xl.XAttnError, match="exactly one"):
        xl.XAttnSaliencyMonitor(every_n_epochs=1, every_n_steps=5)
    with pytest.raises(xl.UnknownNameError, match="spes"):
        xl.XAttnSaliencyMonitor(methods=("gradcam",))
    with pytest.raises(TypeError, match="nmasks"):  # every option is an explicit parameter
        xl.XAttnSaliencyMonitor(nmasks=4)
    with pytest.raises(xl.UnknownNameError, match="n_masks"):
        xl.XAttnSaliencyMonitor(saliency_options={"nmasks": 4})
    with pytest.raises(xl.XAttnError, match="positive"):
        xl.XAttnSaliencyMonitor(num_probes=0)
    with pytest.raises(xl.UnknownNameError, match="labels"):
        xl.XAttnSaliencyMonitor(targets="refs")


def test_fault_in_monitor_is_warned_and_training_continues(tmp_path):
    def broken(_):
        raise RuntimeError("injected fault")

    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=1, methods=("encoder_spes",), n_masks=4, model_fn=broken
    )
    with pytest.warns(UserWarning, match="injected fault"):
        _, trainer = fit_demo(tmp_path, mon)
    assert trainer.current_epoch == 2 and mon.history == []
    mon_raise = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=1, methods=("encoder_spes",), n_masks=4, model_fn=broken, on_error="raise"
    )
    with pytest.raises(RuntimeError, match="injected fault"):
        fit_demo(tmp_path / "r", mon_raise)


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_same_numbers(tmp_path):
    kw = dict(num_probes=4, methods=("encoder_spes",), n_masks=8, targets="labels")
    single = xl.XAttnSaliencyMonitor(max_overhead=None, **kw)
    # lr=0: both runs explain the same (initial) weights, whatever order the ranks saw the data in
    fit_demo(tmp_path / "single", single, CSVLogger(tmp_path / "single"), max_epochs=1, lr=0.0)
    ddp = xl.XAttnSaliencyMonitor(max_overhead=None, **kw)
    pl.seed_everything(0)
    tr, va = loaders(48, 6, batch_size=8)
    model = DemoModule(lr=0.0)
    trainer = cpu_trainer(tmp_path, [ddp], CSVLogger(tmp_path / "ddp"), devices=2, max_epochs=1, use_distributed_sampler=False)
    trainer.fit(model, tr, va)
    rows = read_csv(glob.glob(str(tmp_path / "ddp/lightning_logs/*/metrics.csv"))[0])
    (x,) = [r for r in rows if r.get("xattn/encoder_spes/pearson")]
    assert float(x["xattn/num_probes"]) == 4.0
    # each rank explained 2 of the 4 probes; gathered, the numbers are the single-process ones
    assert float(x["xattn/encoder_spes/pearson"]) == pytest.approx(
        single.history[0]["xattn/encoder_spes/pearson"], abs=1e-5
    )


def _timed_probes(n=3):
    """Demo utterances with their true word timings (one token = one word, 10-ms input frames)."""
    from xattn_lightning.demo import SyntheticSpeech, collate

    ds = SyntheticSpeech(n, seed=7)
    batches = []
    for i in range(n):
        item = ds[i]
        words, t = [], 0
        for k in item["labels"][:-1].tolist():
            length = 3 + k % 4
            words.append((f"w{k}", t * 0.01, (t + length) * 0.01))
            t += length + 1
        b = collate([item])
        b["words"] = [words]
        batches.append(b)
    return batches


def test_timed_probes_give_word_timestamp_scores_and_export_heads(tmp_path):
    from types import SimpleNamespace

    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=3,
        methods=("encoder_spes",),
        n_masks=16,
        targets="labels",
        probes=_timed_probes(),
        tokenizer=lambda i: f" w{i}",
        export_alignment_heads=True,
    )
    pl.seed_everything(0)
    model = DemoModule(lr=3e-3)
    model.model.generation_config = SimpleNamespace(alignment_heads=None)
    tr, va = loaders(48, 6, batch_size=8)
    cpu_trainer(tmp_path, [mon], CSVLogger(tmp_path)).fit(model, tr, va)
    rows = [
        r for r in read_csv(glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))[0]) if r.get("xattn/seconds")
    ]
    assert len(rows) == 2
    for r in rows:
        assert float(r["xattn/timestamps/boundaries"]) > 0
        assert 0 <= float(r["xattn/timestamps/mae_ms"]) < 1000
        assert 0 <= float(r["xattn/timestamps/within_50ms"]) <= float(r["xattn/timestamps/within_100ms"]) <= 1
    assert mon.alignment_heads and all(len(h) == 2 for h in mon.alignment_heads)
    assert model.model.generation_config.alignment_heads == mon.alignment_heads
    assert mon.state_dict()["alignment_heads"] == mon.alignment_heads


def test_export_without_timed_probes_or_config_warns(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=2,
        methods=("encoder_spes",),
        n_masks=8,
        targets="labels",
        export_alignment_heads=True,
    )
    with pytest.warns(UserWarning, match="export_alignment_heads"):
        fit_demo(tmp_path, mon, max_epochs=1)
    assert mon.alignment_heads is None


def test_timed_probes_without_token_strings_warn_and_log_the_rest(tmp_path):
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=2,
        methods=("encoder_spes",),
        n_masks=8,
        targets="labels",
        probes=_timed_probes(2),
    )
    with pytest.warns(UserWarning, match="word timestamps of the probes could not be made"):
        fit_demo(tmp_path, mon, max_epochs=1)
    assert mon.history and "xattn/encoder_spes/pearson" in mon.history[-1]
    assert "xattn/timestamps/mae_ms" not in mon.history[-1]
