"""The batch layouts of public speech fine-tuning code, written from their descriptions (not copied), each in a
training script that adds the monitor as its one line: it reads with no other line, or warns before the first
training step with a fix that, applied as the warning writes it, reads. Training stays bit-identical with and
without the monitor in every one."""

from __future__ import annotations

import json
import re
import warnings
from collections import namedtuple
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import speaking_tiny_whisper, tiny_extractor
from torch.utils.data import DataLoader, Dataset

import xattn_lightning as xl
from xattn_lightning.testing import TinyS2T

EOS, SOT = 50, 51  # the tiny Whisper's end of text and start of transcript
_EXTRACTOR = tiny_extractor()


def _utterances(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        wav = 0.1 * torch.randn(3200 + 1600 * i, generator=g)
        toks = torch.randint(3, 40, (3 + i % 3,), generator=g).tolist()
        out.append({"id": f"u{i}", "wav": wav, "toks": toks, "text": " ".join(f"w{t}" for t in toks)})
    return out


def log_mel(wavs: list[torch.Tensor]) -> torch.Tensor:
    """What these scripts compute from raw audio: the tiny Whisper's log-mel features ``[B, 16, 200]``."""
    arrays = [w.numpy() for w in wavs]
    return _EXTRACTOR(arrays, sampling_rate=16000, return_tensors="pt").input_features


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s)
    return out


def _wavs(us: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(u["wav"]) for u in us])
    wav = torch.zeros(len(us), int(lens.max()))
    for b, u in enumerate(us):
        wav[b, : len(u["wav"])] = u["wav"]
    return wav, lens


def _labels(us: list[dict]) -> torch.Tensor:
    return _pad([u["toks"] + [EOS] for u in us], -100)


# ---------------------------------------------------------------- the layouts: (collate, what the script's step reads)
@dataclass
class SpecBatch:  # a script's own dataclass, with its own names
    spec: torch.Tensor
    tgt: torch.Tensor
    sentences: list[str]


PaddedData = namedtuple("PaddedData", ["data", "lengths"])


class PaddedBatch:
    """SpeechBrain's batch as described: each key an attribute, padded tensors as ``PaddedData(data, lengths)``
    with lengths relative to the longest."""

    def __init__(self, **values) -> None:
        self._keys = list(values)
        for k, v in values.items():
            setattr(self, k, v)


def _rel(lens: torch.Tensor) -> torch.Tensor:
    return lens.float() / lens.max()


LAYOUTS = {
    # the Hugging Face recipe's collator: features, labels padded with -100
    "hf_recipe": (
        lambda us: {"input_features": log_mel([u["wav"] for u in us]), "labels": _labels(us)},
        lambda b: (b["input_features"], b["labels"]),
    ),
    # openai-whisper fine-tuning repositories: (mel, y_in, y_out), y_in padded with EOT
    "openai_eot": (
        lambda us: (log_mel([u["wav"] for u in us]), _pad([[SOT] + u["toks"] for u in us], EOS), _labels(us)),
        lambda b: (b[0], b[2]),
    ),
    # the same with the collate that pads y_in with 0 (the case a user hit)
    "openai_zero": (
        lambda us: (log_mel([u["wav"] for u in us]), _pad([[SOT] + u["toks"] for u in us], 0), _labels(us)),
        lambda b: (b[0], b[2]),
    ),
    # a feature extractor's and a tokenizer's outputs side by side
    "batchfeature_pair": (
        lambda us: _bf_pair(us),
        lambda b: (b[0]["input_features"], b[1]["input_ids"].masked_fill(b[1]["attention_mask"] == 0, -100)),
    ),
    # a third-party package's dict: names the monitor does not know, references as strings
    "unknown_keys": (
        lambda us: {
            "logmel": log_mel([u["wav"] for u in us]),
            "decoder_in": _pad([[SOT] + u["toks"] for u in us], EOS),
            "gold": _labels(us),
            "refs": [u["text"] for u in us],
        },
        lambda b: (b["logmel"], b["gold"]),
    ),
    # a script's own dataclass
    "dataclass": (
        lambda us: SpecBatch(log_mel([u["wav"] for u in us]), _labels(us), [u["text"] for u in us]),
        lambda b: (b.spec, b.tgt),
    ),
    # ESPnet: raw speech with lengths, text padded with -1 (its ignore id); the model makes its own features
    "espnet": (
        lambda us: {
            "speech": _wavs(us)[0],
            "speech_lengths": _wavs(us)[1],
            "text": _pad([u["toks"] + [EOS] for u in us], -1),
            "text_lengths": torch.tensor([len(u["toks"]) + 1 for u in us]),
        },
        lambda b: (espnet_features(b)["input_features"], b["text"].masked_fill(b["text"] < 0, -100)),
    ),
    # SpeechBrain: a PaddedBatch of PaddedData, tokens with BOS and with EOS padded with 0, raw signal
    "speechbrain": (
        lambda us: PaddedBatch(
            id=[u["id"] for u in us],
            sig=PaddedData(_wavs(us)[0], _rel(_wavs(us)[1])),
            tokens_bos=PaddedData(_pad([[SOT] + u["toks"] for u in us], 0), _rel(torch.tensor([1 + len(u["toks"]) for u in us]))),
            tokens_eos=PaddedData(_pad([u["toks"] + [EOS] for u in us], 0), _rel(torch.tensor([1 + len(u["toks"]) for u in us]))),
            wrd=[u["text"] for u in us],
        ),
        lambda b: (speechbrain_features(b)["input_features"], speechbrain_features(b)["labels"]),
    ),
    # two identical id tensors: which are the labels cannot be told; the warning gives the line
    "ambiguous_ids": (
        lambda us: (log_mel([u["wav"] for u in us]), _labels(us), _labels(us).clone()),
        lambda b: (b[0], b[1]),
    ),
}  # fmt: skip


def _bf_pair(us):
    from transformers import BatchEncoding, BatchFeature

    ids = _pad([u["toks"] + [EOS] for u in us], EOS)
    mask = _pad([[1] * (len(u["toks"]) + 1) for u in us], 0)
    return BatchFeature({"input_features": log_mel([u["wav"] for u in us])}), BatchEncoding(
        {"input_ids": ids, "attention_mask": mask}
    )


def espnet_features(batch) -> dict:
    """The fix an ESPnet user writes (by import path): the model's features from the raw speech."""
    wavs = [w[:n] for w, n in zip(batch["speech"], batch["speech_lengths"])]
    return {"input_features": log_mel(wavs), "labels": batch["text"].masked_fill(batch["text"] < 0, -100)}


def speechbrain_features(batch) -> dict:
    """The fix a SpeechBrain user writes (by import path)."""
    sig, rel = batch.sig
    n = (rel * sig.shape[1]).round().long()
    eos = batch.tokens_eos.data
    lens = (batch.tokens_eos.lengths * eos.shape[1]).round().long()
    labels = eos.masked_fill(torch.arange(eos.shape[1])[None] >= lens[:, None], -100)
    return {"input_features": log_mel([w[:k] for w, k in zip(sig, n)]), "labels": labels}


class _ListDataset(Dataset):
    def __init__(self, us):
        self.us = us

    def __len__(self):
        return len(self.us)

    def __getitem__(self, i):
        return self.us[i]


class ZooModule(pl.LightningModule):
    """A script's module: its step reads its own layout; validation on the same layout."""

    def __init__(self, to_xy, seen: list) -> None:
        super().__init__()
        self.model = speaking_tiny_whisper()
        self.to_xy, self.seen = to_xy, seen
        self.warned_before_first_step: int | None = None

    def training_step(self, batch, batch_idx):
        if self.warned_before_first_step is None:
            self.warned_before_first_step = len(self.seen)
        x, y = self.to_xy(batch)
        return self.model(input_features=x, labels=y).loss

    def validation_step(self, batch, batch_idx):
        x, y = self.to_xy(batch)
        self.log("val_loss", self.model(input_features=x, labels=y).loss, batch_size=x.shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(layout: str, monitor) -> tuple[ZooModule, list[str]]:
    collate, to_xy = LAYOUTS[layout]
    pl.seed_everything(0)
    seen: list = []
    module = ZooModule(to_xy, seen)
    train = DataLoader(_ListDataset(_utterances(4)), batch_size=2, shuffle=True, collate_fn=collate)
    val = DataLoader(_ListDataset(_utterances(2, seed=1)), batch_size=2, collate_fn=collate)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor] if monitor else [], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        module.seen = rec
        trainer.fit(module, train, val)
    said = [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message)]
    return module, [m for m in said if "not logged while" not in m and "no tokenizer" not in m]


def _monitor(**kw):
    return xl.XAttnSaliencyMonitor(**{"max_overhead": None, "num_probes": 2, "n_masks": 8, "max_new_tokens": 4, **kw})


def _same_training(a: ZooModule, b: ZooModule) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


_BASELINES: dict[str, ZooModule] = {}


def _baseline(layout: str) -> ZooModule:
    if layout not in _BASELINES:
        _BASELINES[layout] = _fit(layout, None)[0]
    return _BASELINES[layout]


@pytest.mark.parametrize("layout", ["hf_recipe", "openai_eot", "openai_zero", "batchfeature_pair", "unknown_keys", "dataclass"])
def test_the_layout_reads_with_the_monitor_as_the_one_added_line(layout):
    monitor = _monitor()
    module, said = _fit(layout, monitor)
    assert said == [], said
    assert len(monitor.history) == 1 and monitor.history[0]["xattn/num_probes"] == 2.0
    assert np.isfinite(monitor.history[0]["xattn/encoder_spes/pearson"])
    assert _same_training(module, _baseline(layout))


def test_the_decoder_input_padded_with_0_is_told_from_the_labels():
    monitor = _monitor(targets="labels")  # the labels are read and explained, not the decoder input
    _, said = _fit("openai_zero", monitor)
    assert said == [] and len(monitor.history) == 1
    short = _utterances(2, seed=1)[0]["toks"]  # the shorter validation utterance: its y_in ends in 0 padding
    assert len(short) < len(_utterances(2, seed=1)[1]["toks"])
    assert monitor.last_explanations[0].token_ids.tolist() == short  # the labels' text tokens (EOS not shown)


@pytest.mark.parametrize(
    "layout, fix",
    [
        ("espnet", {"batch_fn": "test_standard:espnet_features"}),
        ("speechbrain", {"batch_fn": "test_standard.speechbrain_features"}),
        ("ambiguous_ids", "from the warning"),
    ],
)
def test_the_layout_warns_before_training_with_a_fix_that_reads(layout, fix):
    module, said = _fit(layout, _monitor())
    assert len(said) == 2, said  # the cause with the fix before the first step; the count at the end
    assert "nothing will be read" in said[0] and "batch_keys=" in said[0] and "batch_fn=" in said[0]
    assert "YAML: batch_keys:" in said[0]
    assert module.warned_before_first_step is not None and module.warned_before_first_step >= 1
    assert "readings due in this run were not taken" in said[1]
    if fix == "from the warning":  # the line the warning writes, applied as it is written
        fix = {"batch_keys": json.loads(re.search(r"batch_keys=(\{[^}]*\})", said[0]).group(1))}
    monitor = _monitor(**fix)
    fixed, said = _fit(layout, monitor)
    assert said == [] and len(monitor.history) == 1
    assert _same_training(fixed, module) and _same_training(fixed, _baseline(layout))


def test_fairseq_net_input_with_a_custom_model():
    """fairseq speech-to-text: filterbanks as ``net_input.src_tokens`` with ``src_lengths``, the decoder input as
    ``prev_output_tokens``, both padded with its pad id 1 (a real token id elsewhere), EOS 2 first."""
    pad, eos = 1, 2
    g = torch.Generator().manual_seed(0)
    utts = [(torch.randn(24 + 8 * i, 8, generator=g), torch.randint(4, 32, (4 + i % 3,), generator=g).tolist()) for i in range(4)]

    def collate(items):
        lens = torch.tensor([f.shape[0] for f, _ in items])
        fb = torch.zeros(len(items), int(lens.max()), 8)
        for b, (f, _) in enumerate(items):
            fb[b, : f.shape[0]] = f
        return {
            "id": torch.arange(len(items)),
            "net_input": {"src_tokens": fb, "src_lengths": lens, "prev_output_tokens": _pad([[eos] + t for _, t in items], pad)},
            "target": _pad([t + [eos] for _, t in items], pad),
            "ntokens": sum(len(t) + 1 for _, t in items),
        }  # fmt: skip

    class Fairseq(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyS2T(vocab_size=32, num_mel_bins=8)

        def training_step(self, batch, batch_idx):
            logits = self.model(batch["net_input"]["src_tokens"], batch["net_input"]["prev_output_tokens"])
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["target"], ignore_index=pad)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def run(monitor):
        pl.seed_everything(0)
        module = Fairseq()
        trainer = pl.Trainer(max_epochs=1, callbacks=[monitor] if monitor else [], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")  # fmt: skip
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            trainer.fit(module, DataLoader(utts, batch_size=2, shuffle=True, collate_fn=collate))
        return module, [str(w.message) for w in rec if "XAttnSaliencyMonitor" in str(w.message) and "not logged" not in str(w.message)]

    probes = DataLoader(utts[:2], batch_size=2, collate_fn=collate)
    monitor = _monitor(
        probes=probes, targets="labels", model_fn=lambda m: TinyS2T.adapter(m.model, decoder_start_id=eos, eos_id=eos)
    )
    module, said = run(monitor)
    assert [m for m in said if "tokenizer" not in m] == []
    assert len(monitor.history) == 1
    e = monitor.last_explanations[0]  # the target, not the decoder input, its padding cut (EOS not shown)
    assert e.token_ids.tolist() == utts[0][1]
    assert e.num_frames == 24  # src_lengths read as the features' lengths
    assert _same_training(module, run(None)[0])


def test_a_map_style_dataset_the_monitor_cannot_batch_is_said_before_the_first_step():
    class Waves(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"wave": np.zeros(1600, dtype=np.float32)}

    module, said = _fit("hf_recipe", _monitor(probes=Waves()))
    assert len(said) == 2 and "the probes= source" in said[0] and "[B, 16, 200]" in said[0], said
    assert module.warned_before_first_step >= 1
    assert _same_training(module, _baseline("hf_recipe"))


class _Words:
    """Enough of a tokenizer for word timestamps: each id a word."""

    def convert_ids_to_tokens(self, ids):
        return [f" w{i}" for i in ids]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)


def test_the_library_takes_the_layouts_the_monitor_takes():
    """``xl.explain``, ``xl.word_timestamps`` and ``xl.alignment_heads`` read a script's batch as the monitor does."""
    model = speaking_tiny_whisper()
    us = _utterances(2)
    as_dict = LAYOUTS["hf_recipe"][0](us)
    for layout in ("openai_zero", "unknown_keys", "dataclass", "batchfeature_pair"):
        batch = LAYOUTS[layout][0](us)
        a = xl.explain(model, batch, targets="labels")
        b = xl.explain(model, as_dict, targets="labels")
        assert all(torch.equal(x.cross_attention, y.cross_attention) for x, y in zip(a, b)), layout
        xl.timestamps.forget_heads(model)  # each call chooses the head set afresh, on the same two utterances
        words = xl.word_timestamps(model, batch, targets="labels", tokenizer=_Words())
        xl.timestamps.forget_heads(model)
        assert words == xl.word_timestamps(model, as_dict, targets="labels", tokenizer=_Words()) and words[0]
    heads = xl.alignment_heads(model, [LAYOUTS["openai_eot"][0](us)], n_masks=8, targets="labels")
    assert heads == xl.alignment_heads(model, [as_dict], n_masks=8, targets="labels")


def test_probes_from_a_streaming_dataset_and_a_shuffled_loader_are_its_first_items_in_order():
    us = _utterances(4)
    feats = log_mel([u["wav"] for u in us])

    class Stream(torch.utils.data.IterableDataset):  # items of one utterance each, without a batch dimension
        def __iter__(self):
            for i, u in enumerate(us):
                yield {"logmel": feats[i], "gold": torch.tensor(u["toks"] + [EOS]), "uttid": u["id"]}

    shuffled = DataLoader(_ListDataset(us), batch_size=2, shuffle=True, collate_fn=LAYOUTS["unknown_keys"][0])
    for probes, ids in ((shuffled, ["probe0", "probe1"]), (Stream(), ["u0", "u1"])):
        monitor = _monitor(probes=probes)
        module, said = _fit("hf_recipe", monitor)
        assert said == [] and len(monitor.history) == 1
        assert monitor.instrument.collector.probe_set.positions == [0, 1] and monitor.probe_ids == ids
        assert _same_training(module, _baseline("hf_recipe"))


def _seq2seq(tmp_path, eval_dataset, callback: bool):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    import xattn_lightning.integrations.transformers as integration

    g = torch.Generator().manual_seed(0)
    train = [{"input_features": torch.randn(16, 200, generator=g).tolist(), "labels": torch.randint(3, 40, (6,), generator=g).tolist()}
             for _ in range(4)]  # fmt: skip
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
        learning_rate=1e-3, eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    collate = lambda items: {k: torch.tensor([i[k] for i in items]) for k in ("input_features", "labels")}  # noqa: E731
    trainer = Seq2SeqTrainer(model=speaking_tiny_whisper(seed=0).train(), args=args, train_dataset=train,
                             eval_dataset=eval_dataset, data_collator=collate)  # fmt: skip
    cb = integration.XAttnSaliencyCallback(trainer, num_probes=2, n_masks=8, max_new_tokens=4, max_overhead=None)
    if callback:
        trainer.add_callback(cb)  # the one added line
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in rec if "XAttnSaliencyCallback" in str(w.message) and "not logged while" not in str(w.message)]
    return trainer, cb, said


def test_a_streaming_eval_set_of_a_seq2seq_trainer_reads_with_one_line(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the dev extras")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_features": torch.randn(16, 200, generator=g).tolist(), "labels": torch.randint(3, 40, (5,), generator=g).tolist(),
             "id": f"e{i}"} for i in range(3)]  # fmt: skip
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    trainer, cb, said = _seq2seq(tmp_path / "a", stream, callback=True)
    assert [m for m in said if "no tokenizer" not in m] == []
    assert len(cb.history) == 1 and cb.instrument.collector.probe_set.ids == ["e0", "e1"]
    plain, _, _ = _seq2seq(tmp_path / "b", datasets.IterableDataset.from_generator(lambda: iter(rows)), callback=False)
    a, b = trainer.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_takes_the_same_probes_from_a_probes_source(tmp_path):
    """The probe set of a ``probes=`` source is fixed at fit start; a resume from a checkpoint takes exactly the
    stored positions again, before the first step."""
    collate, to_xy = LAYOUTS["unknown_keys"]
    probes = DataLoader(_ListDataset(_utterances(4, seed=2)), batch_size=2, shuffle=True, collate_fn=collate)

    def run(epochs: int, ckpt=None):
        pl.seed_everything(0)
        monitor = _monitor(probes=probes, num_probes=3, targets="labels")
        module = ZooModule(to_xy, [])
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                             num_sanity_val_steps=0)  # fmt: skip
        train = DataLoader(_ListDataset(_utterances(4)), batch_size=2, collate_fn=collate)
        trainer.fit(module, train, ckpt_path=ckpt)
        return monitor, trainer

    first, trainer = run(1)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _ = run(2, str(ckpt))
    assert resumed.instrument.collector.probe_set.positions == first.instrument.collector.probe_set.positions == [0, 1, 2]
    assert resumed.probe_ids == first.probe_ids and len(resumed.history) == 2
