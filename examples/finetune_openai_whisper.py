"""Fine-tune an openai-whisper model (``whisper.load_model``) with Lightning, XAttnSaliencyMonitor on.

Written in the style of the widely copied ``WhisperModelModule`` fine-tuning notebooks: a dataset
of ``{"input_ids": log-mel, "labels", "dec_input_ids"}`` dicts, a padding collator, a
LightningModule that trains the decoder over a frozen encoder. The lines that add the monitor are
marked ``# <-- xattn_lightning``: the monitor finds the model (``self.model``), its tokenizer
(``self.tokenizer``) and the batch layout by itself.

    pip install "xattn_lightning[openai-whisper]"
    python examples/finetune_openai_whisper.py --manifest train.tsv --val-manifest dev.tsv --model tiny.en

``--model`` is a model name for ``whisper.load_model`` (downloaded by the package), a ``.pt``
checkpoint in openai-whisper's format, or a Hugging Face Whisper directory (converted, no
download). ``--no-val`` drops the validation loop, as many training scripts have none: the
monitor then explains ``--num-probes`` held-out utterances given as ``probes=``. The manifest is
``id<TAB>audio<TAB>text`` (16-kHz audio paths relative to the manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import whisper
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xattn_lightning import XAttnSaliencyMonitor  # <-- xattn_lightning
from xattn_lightning.audio import load_audio, read_manifest
from xattn_lightning.errors import XAttnError


def load_model(name: str) -> nn.Module:
    """``whisper.load_model`` for a name or ``.pt`` file; a Hugging Face directory is converted."""
    if Path(name).is_dir():
        from transformers import WhisperForConditionalGeneration

        from xattn_lightning.adapters.openai_whisper import openai_whisper_from_hf

        return openai_whisper_from_hf(WhisperForConditionalGeneration.from_pretrained(name))
    return whisper.load_model(name, device="cpu")


class SpeechDataset(Dataset):
    def __init__(self, manifest: str | Path, tokenizer, n_mels: int = 80) -> None:
        self.rows = read_manifest(manifest)
        self.tokenizer = tokenizer
        self.n_mels = n_mels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        audio = whisper.pad_or_trim(load_audio(row.audio))
        mel = whisper.log_mel_spectrogram(audio, n_mels=self.n_mels)
        text = [*self.tokenizer.sot_sequence_including_notimestamps] + self.tokenizer.encode(" " + row.text)
        labels = text[1:] + [self.tokenizer.eot]
        return {"input_ids": mel, "labels": labels, "dec_input_ids": text}


class WhisperDataCollatorWithPadding:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        input_ids = torch.stack([f["input_ids"] for f in features])
        width = max(len(f["labels"]) for f in features)
        labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
        dec = torch.tensor([f["dec_input_ids"] + [self.pad_id] * (width - len(f["dec_input_ids"])) for f in features])
        return {"input_ids": input_ids, "labels": labels, "dec_input_ids": dec}


class WhisperModelModule(pl.LightningModule):
    def __init__(self, model_name: str = "tiny.en", lr: float = 1e-5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(model_name)
        self.tokenizer = whisper.tokenizer.get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages, language="en", task="transcribe"
        )
        for p in self.model.encoder.parameters():  # only the decoder is trained
            p.requires_grad = False
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=-100)

    def _loss(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            audio_features = self.model.encoder(batch["input_ids"])
        out = self.model.decoder(batch["dec_input_ids"].long(), audio_features)
        return self.loss_fn(out.view(-1, out.size(-1)), batch["labels"].long().view(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.hparams.lr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Fine-tune openai-whisper with XAttnSaliencyMonitor.")
    ap.add_argument("--model", default="tiny.en", help="whisper model name, .pt checkpoint or HF directory")
    ap.add_argument("--manifest", required=True, help="training TSV (id, audio, text)")
    ap.add_argument("--val-manifest", help="validation TSV (default: the training manifest)")
    ap.add_argument("--no-val", action="store_true", help="no validation loop: the monitor gets probes=")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--limit-train-batches", type=float, default=1.0)
    ap.add_argument("--num-probes", type=int, default=4)
    ap.add_argument(
        "--n-masks", type=lambda v: v if v == "auto" else int(v), default="auto", help="masks per map or 'auto'"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-overhead",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=0.1,
        help="skip readings while the monitor uses more than this share of training time ('none': never)",
    )
    ap.add_argument("--no-monitor", action="store_true", help="the same fine-tune without the monitor (to compare)")
    ap.add_argument("--out", default="runs/finetune_openai_whisper")
    ap.add_argument("--accelerator", default="auto")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    module = WhisperModelModule(args.model, lr=args.lr)
    n_mels = module.model.dims.n_mels
    collate = WhisperDataCollatorWithPadding(module.tokenizer.eot)
    train = DataLoader(
        SpeechDataset(args.manifest, module.tokenizer, n_mels), batch_size=args.batch_size, shuffle=True,
        collate_fn=collate,
    )  # fmt: skip
    held_out = SpeechDataset(args.val_manifest or args.manifest, module.tokenizer, n_mels)
    val = None if args.no_val else DataLoader(held_out, batch_size=args.batch_size, collate_fn=collate)
    monitor = XAttnSaliencyMonitor(  # <-- xattn_lightning
        num_probes=args.num_probes,  # <-- xattn_lightning
        probes=held_out if args.no_val else None,  # <-- xattn_lightning: only needed without validation
        n_masks=args.n_masks,  # <-- xattn_lightning
        max_overhead=args.max_overhead,  # <-- xattn_lightning
    )  # <-- xattn_lightning
    out = Path(args.out)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        callbacks=[] if args.no_monitor else [monitor],  # <-- xattn_lightning
        logger=pl.loggers.CSVLogger(out, name="csv"),
        accelerator=args.accelerator,
        default_root_dir=out,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    trainer.fit(module, train, val)
    return {"history": monitor.history, "monitor": monitor, "trainer": trainer, "module": module, "out": out}


if __name__ == "__main__":
    try:
        main()
    except XAttnError as err:
        sys.exit(f"error: {err}")
