"""The monitor in the training scripts people have: no validation loop, tuple batches, no tokenizer
argument, DDP with Lightning's default sampler; and never silent when it cannot run."""

import glob
import logging
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import cpu_trainer, lora_model, read_csv, speaking_tiny_whisper, tuple_data
from lightning.pytorch.loggers import CSVLogger
from test_hosts import MODULES
from torch.utils.data import DataLoader

import xattn_lightning as xl
from xattn_lightning.batches import standard_batch

#: a public HF-Whisper script's module (training step on tuples, no validation) and the same with validation
TrainOnly = MODULES["lightning.pytorch"]["TrainOnly"]
WithValidation = MODULES["lightning.pytorch"]["WithValidation"]


class FakeTokenizer:
    """Enough of a tokenizer: ids -> strings."""

    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def fit(tmp_path, module, monitor, val=None, **kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2),
        callbacks=[monitor],
        logger=kw.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        **kw,
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(tuple_data(8), batch_size=2, shuffle=True), val)
    # what the monitor says about the setup (the noise of an 8-mask map is another matter)
    msgs = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    return trainer, [m for m in msgs if "pearson_corrected is not logged" not in m]


def test_training_only_module_with_tuple_batches_gets_readings_through_probes(tmp_path):
    probes = DataLoader(tuple_data(3, seed=1), batch_size=2)  # (features, labels) tuples, no batch_fn
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=3, probes=probes, targets="labels", n_masks=16, tokenizer=FakeTokenizer()
    )
    trainer, warned = fit(tmp_path, TrainOnly(), mon, logger=CSVLogger(tmp_path))
    assert warned == []
    assert [h["epoch"] for h in mon.history] == [0, 1] and mon.probe_ids == ["probe0", "probe1", "probe2"]
    for h in mon.history:
        assert h["xattn/num_probes"] == 3.0 and math.isfinite(h["xattn/encoder_spes/pearson"])
    rows = read_csv(glob.glob(str(tmp_path / "lightning_logs/*/metrics.csv"))[0])
    xsteps = [int(r["step"]) for r in rows if r.get("xattn/encoder_spes/pearson")]
    assert xsteps == [int(r["step"]) for r in rows if r.get("train_loss")] == [3, 7]  # beside the epoch's metrics
    assert mon.last_explanations[0].tokens[0].startswith("w")


def test_probes_as_a_dataset_or_a_list_with_batch_fn_and_a_step_schedule(tmp_path):
    ds = tuple_data(2, seed=1)
    weird = [{"audio": {"mel": ds[i][0].unsqueeze(0)}, "y": ds[i][1].unsqueeze(0)} for i in range(2)]
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        every_n_steps=3,
        num_probes=2,
        probes=weird,
        batch_fn=lambda b: {"input_features": b["audio"]["mel"], "labels": b["y"]},
        targets="labels",
        n_masks=8,
        tokenizer=FakeTokenizer(),
    )
    fit(tmp_path, TrainOnly(), mon, max_epochs=2)
    assert [h["step"] for h in mon.history] == [3, 6]  # 4 optimizer steps per epoch, every 3
    mon2 = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, probes=ds, targets="labels", n_masks=8, tokenizer=FakeTokenizer()
    )
    fit(tmp_path / "ds", TrainOnly(), mon2, max_epochs=1)  # a map-style Dataset of unbatched items
    assert len(mon2.history) == 1 and mon2.history[0]["xattn/num_probes"] == 2.0


def test_readings_run_at_epoch_end_when_validation_skips_that_epoch(tmp_path):
    val = DataLoader(tuple_data(2, seed=2), batch_size=2)
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None,
        num_probes=2,
        probes=tuple_data(2, seed=1),
        targets="labels",
        n_masks=8,
        tokenizer=FakeTokenizer(),
    )
    fit(tmp_path, WithValidation(), mon, val=val, max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    assert [h["epoch"] for h in mon.history] == [0, 1, 2, 3]


def test_without_validation_or_probes_the_first_training_utterances_are_read(tmp_path, caplog):
    """A public script with no validation loop reads with the one added line: its first training utterances (in
    the dataset's order, whatever the shuffling sampler) are the probes, said once as information."""
    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, n_masks=8, targets="labels", tokenizer=FakeTokenizer())
    with caplog.at_level(logging.INFO):
        _, warned = fit(tmp_path, TrainOnly(), mon)
    assert warned == [] and [h["epoch"] for h in mon.history] == [0, 1]
    assert mon.probe_ids == ["probe0", "probe1"] and mon.instrument.collector.probe_set.positions == [0, 1]
    assert any("no validation loop: the probes are the first 2 training utterances" in r.getMessage() for r in caplog.records)
    one = mon.last_explanations[0].token_ids.tolist()
    assert one == [t for t in tuple_data(8)[0][1].tolist() if t < 50]  # the first training item's labels


def test_without_any_data_source_it_says_so_at_fit_start(tmp_path):
    class Batches:  # an iterable of batches, not a DataLoader: no dataset to take items from
        def __iter__(self):
            return iter([tuple(t.unsqueeze(0) for t in tuple_data(2)[i]) for i in range(2)])

        def __len__(self):
            return 2

    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, n_masks=8, tokenizer=FakeTokenizer())
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[mon], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(TrainOnly(), Batches())
    said = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    assert "nothing will be logged" in said[0] and "probes=" in said[0] and mon.history == []


def test_no_model_no_probe_and_no_tokenizer_are_each_warned_once(tmp_path):
    class Custom(TrainOnly):  # a custom encoder-decoder no adapter knows
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)
            self.seq2seq = torch.nn.Transformer(16, 2, 1, 1, 16, batch_first=True)
            del self.model

        def training_step(self, batch, batch_idx):
            x = batch[0].transpose(1, 2)[:, :10]
            return self.seq2seq(x, x).pow(2).mean()

    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, probes=tuple_data(2), targets="labels", n_masks=8)
    _, warned = fit(tmp_path, Custom(), mon)
    assert len([w for w in warned if "model_fn=" in w]) == 2, warned  # at fit start, and in the end summary
    assert "nothing will be logged: no supported model" in warned[0] and "2 because no supported model" in warned[-1]
    assert mon.history == []
    bad = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, probes=[{"wave": torch.randn(2, 100)}], n_masks=8)
    _, warned = fit(tmp_path / "b", TrainOnly(), bad)
    assert len([w for w in warned if "batch_fn=" in w]) == 1, warned  # said at fit start, once
    assert len([w for w in warned if "token ids" in w and "tokenizer=" in w]) == 1, warned


def test_tokenizer_is_found_on_the_module(tmp_path):
    module = TrainOnly()
    module.processor = FakeTokenizer()
    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=1, probes=tuple_data(1), targets="labels", n_masks=8)
    _, warned = fit(tmp_path, module, mon, max_epochs=1)
    assert warned == []
    e = mon.last_explanations[0]
    assert e.tokens == [f"w{i}" for i in e.token_ids.tolist()] and e.text.startswith("w")


def test_standard_batch_shapes():
    x, y = torch.randn(2, 16, 200), torch.randint(0, 9, (2, 4))
    assert set(standard_batch([x, y])) == {"input_features", "labels"}
    assert set(standard_batch({"input_ids": x, "labels": y, "dec_input_ids": y})) == {
        "input_features",
        "labels",
        "dec_input_ids",
    }
    assert torch.equal(standard_batch({"features": x, "targets": y}, "feats")["feats"], x)
    assert set(standard_batch(x)) == {"input_features"}
    assert torch.equal(standard_batch((y, x))["labels"], y)  # by what each is, in any order
    for bad, match in (
        ((x, y, y), "2 token-id tensors .* ambiguous"),
        ({"wave": torch.randn(2, 100, 3, 3)}, "batch_fn="),
        ("text", "batch_fn="),
    ):
        with pytest.raises(xl.XAttnError, match=match):
            standard_batch(bad)


@pytest.mark.timeout(300)
def test_ddp_with_the_default_sampler_equals_one_process(tmp_path):
    """Lightning's DistributedSampler shards validation (rank 0: items 0, 2, 4; rank 1: 1, 3, 5): the
    probes are put back in order, so probe set and readings equal a single-process run."""
    from helpers import fit_demo

    from xattn_lightning.demo import DemoModule, loaders

    kw = dict(num_probes=3, methods=("encoder_spes",), n_masks=8, targets="labels")
    single = xl.XAttnSaliencyMonitor(max_overhead=None, **kw)
    fit_demo(tmp_path / "single", single, CSVLogger(tmp_path / "single"), max_epochs=1, lr=0.0)
    pl.seed_everything(0)
    tr, va = loaders(48, 6, batch_size=2)
    monitor = xl.XAttnSaliencyMonitor(max_overhead=None, **kw)
    trainer = cpu_trainer(tmp_path, [monitor], CSVLogger(tmp_path / "ddp"), devices=2, max_epochs=1)
    trainer.fit(DemoModule(lr=0.0), tr, va)
    rows = read_csv(glob.glob(str(tmp_path / "ddp/lightning_logs/*/metrics.csv"))[0])
    (x,) = [r for r in rows if r.get("xattn/encoder_spes/pearson")]
    assert float(x["xattn/num_probes"]) == 3.0
    assert single.probe_ids == ["syn0000", "syn0001", "syn0002"]
    for key in ("xattn/encoder_spes/pearson", "xattn/encoder_spes/spearman", "xattn/encoder_spes/coverage"):
        assert float(x[key]) == pytest.approx(single.history[0][key], abs=1e-5), key


def test_frame_rate_reaches_spes_segmentation(tmp_path):
    """frame_rate= is the SPES option of the same name (as in xl.explain), and the figures' time axis."""
    from xattn_lightning.saliency.perturbation import segment_counts

    mon = xl.XAttnSaliencyMonitor(max_overhead=None,
        num_probes=1, probes=tuple_data(1), methods=("spes",), targets="labels", n_masks=6, saliency_options={"frame_rate": 50.0},
        tokenizer=FakeTokenizer(),
    )  # fmt: skip
    fit(tmp_path, TrainOnly(), mon, max_epochs=1)
    e = mon.last_explanations[0]
    assert mon.config.reading.saliency.frame_rate == 50.0
    assert e.results["spes"].details["segments"] == segment_counts(e.num_frames, frame_rate=50.0) != segment_counts(e.num_frames)


def test_the_model_frame_rate_is_the_default_of_spes_timestamps_and_figures(tmp_path, monkeypatch):
    """Without frame_rate=, SPES segments, word timestamps and figures count seconds at the adapter's rate."""
    from xattn_lightning.saliency.perturbation import segment_counts
    from xattn_lightning.testing import TinyS2T
    from xattn_lightning.timestamps import alignment_from

    adapter = TinyS2T.adapter(TinyS2T())
    monkeypatch.setattr(type(adapter), "frame_rate", property(lambda self: 50.0))
    batch = {"input_features": torch.randn(1, 120, 8), "labels": torch.tensor([[1, 5, 6, 7, 2]])}
    (e,) = xl.explain(adapter, batch, targets="labels", methods=("spes",), n_masks=4)
    assert e.frame_rate == 50.0
    assert e.results["spes"].details["segments"] == segment_counts(e.num_frames, frame_rate=50.0) != segment_counts(e.num_frames)
    assert alignment_from(e).frame_seconds == e.frames_per_step / 50.0
    (given,) = xl.explain(adapter, batch, targets="labels", methods=("spes",), n_masks=4, frame_rate=25.0)
    assert given.frame_rate == 25.0  # the option, where given, wins


def test_library_api_stands_without_lightning():
    """xl.explain and the adapters import no Lightning; the monitor loads it on first use."""
    import subprocess
    import sys

    code = (
        "import sys, xattn_lightning as xl, xattn_lightning.explain\n"
        "assert 'lightning.pytorch' not in sys.modules, 'the library imported Lightning'\n"
        "from xattn_lightning import XAttnSaliencyMonitor\n"
        "assert 'lightning.pytorch' in sys.modules and XAttnSaliencyMonitor is xl.XAttnSaliencyMonitor\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def _probe_monitor(**kw) -> xl.XAttnSaliencyMonitor:
    """A monitor with two probes of its own, explaining their labels."""
    probes = [next(iter(DataLoader(tuple_data(2, seed=1), batch_size=2)))]
    return xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, targets="labels", probes=probes, **kw)


class Compiled(TrainOnly):
    """``self.model = torch.compile(model)``, as many training scripts do."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.compile(self.model, backend="eager")  # "eager": no C++ toolchain in the test


def test_a_torch_compiled_model_is_explained_through_its_eager_module(tmp_path):
    from torch._dynamo.eval_frame import OptimizedModule

    module = Compiled()
    assert isinstance(module.model, OptimizedModule)
    adapter = xl.adapter_for(module)
    assert type(adapter).__name__ == "WhisperAdapter" and adapter.model is module.model._orig_mod
    assert xl.adapter_for(module.model).model is module.model._orig_mod  # the compiled model itself
    readings = []
    for m in (Compiled(), TrainOnly()):
        mon = _probe_monitor(n_masks=16)
        _, warned = fit(tmp_path, m, mon, max_epochs=1)
        assert not [w for w in warned if "nothing will be logged" in w or "failed" in w], warned
        assert len(mon.history) == 1 and mon.history[0]["xattn/num_failed"] == 0.0
        readings.append({k: v for k, v in mon.history[0].items() if k.startswith("xattn/") and k != "xattn/seconds"})
    assert readings[0] == readings[1]  # the same reading as the model not compiled


class LoRA(TrainOnly):
    """``self.model = get_peft_model(whisper, LoraConfig(...))``: parameter-efficient fine-tuning."""

    def __init__(self) -> None:
        super().__init__()
        self.model = lora_model(self.model)


def test_a_peft_lora_model_is_explained_with_its_adapters_in_the_path(tmp_path):
    from helpers import whisper_batch

    module = LoRA()
    adapter = xl.adapter_for(module)  # LightningModule -> PeftModel -> LoRA-injected Whisper
    assert adapter.model is module.model.get_base_model()
    assert any("lora_A" in n for n, _ in adapter.model.named_modules())
    batch = whisper_batch(adapter.model, lengths=(60,))
    opts = dict(methods=("encoder_spes",), n_masks=16, targets="generate", max_new_tokens=5)
    (with_lora,) = xl.explain(module, batch, **opts)
    merged = module.model.merge_and_unload()  # the same function without the LoRA modules
    (plain,) = xl.explain(merged, batch, **opts)
    assert torch.equal(with_lora.token_ids, plain.token_ids)
    torch.testing.assert_close(with_lora.cross_attention, plain.cross_attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(with_lora.saliency["encoder_spes"], plain.saliency["encoder_spes"], atol=1e-5, rtol=1e-4)
    (base,) = xl.explain(speaking_tiny_whisper(), batch, **opts)  # without LoRA the explanation differs
    assert not torch.allclose(base.cross_attention, plain.cross_attention, atol=1e-3)
    mon = _probe_monitor(n_masks=16)
    _, warned = fit(tmp_path, LoRA(), mon, max_epochs=1)
    assert not [w for w in warned if "nothing will be logged" in w or "failed" in w], warned
    assert len(mon.history) == 1 and mon.history[0]["xattn/num_failed"] == 0.0


def test_fast_dev_run_says_that_it_takes_no_readings(tmp_path):
    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, targets="labels", n_masks=8)
    val = DataLoader(tuple_data(4), batch_size=2)
    _, warned = fit(tmp_path, WithValidation(), mon, val=val, fast_dev_run=True)
    assert mon.history == []
    assert [w for w in warned if "fast_dev_run" in w and "limit_train_batches" in w]


class Backbone(TrainOnly):
    """The model under a name of the script's own choosing."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = self.model
        del self.model

    def training_step(self, batch, batch_idx):
        features, labels = batch
        return self.backbone(input_features=features, labels=labels).loss


class Distillation(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = speaking_tiny_whisper(seed=1)


def test_a_model_under_any_name_is_found_and_two_models_are_an_error_naming_them(tmp_path):
    module = Backbone()
    assert xl.adapter_for(module).model is module.backbone
    mon = _probe_monitor(n_masks=8)
    _, warned = fit(tmp_path, Backbone(), mon, max_epochs=1)
    assert len(mon.history) == 1 and mon.history[0]["xattn/num_failed"] == 0.0
    assert [w for w in warned if "explaining .backbone (WhisperForConditionalGeneration)" in w and "model_fn" in w]
    with pytest.raises(xl.errors.UnsupportedModelError, match=r"2 supported models: \.backbone .*\.teacher .*model_fn"):
        xl.adapter_for(Distillation())
    mon = _probe_monitor(n_masks=8)
    _, warned = fit(tmp_path, Distillation(), mon, max_epochs=1)
    assert mon.history == [] and [w for w in warned if "nothing will be logged" in w and "teacher" in w]
    mon = _probe_monitor(n_masks=8, model_fn=lambda m: m.backbone)
    _, warned = fit(tmp_path, Distillation(), mon, max_epochs=1)
    assert len(mon.history) == 1  # the named one
