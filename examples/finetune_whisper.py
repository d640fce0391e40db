"""Fine-tune Hugging Face Whisper with Lightning on a TSV manifest, with XAttnSaliencyMonitor on.

A plain fine-tuning script; the two lines that add the monitor are marked ``# <-- xattn_lightning``.

    python examples/finetune_whisper.py --manifest train.tsv --val-manifest dev.tsv \
        --model openai/whisper-tiny.en --epochs 3 --out runs/whisper

The manifest is ``id<TAB>audio<TAB>text`` (audio paths relative to the manifest). W&B logs offline
unless ``WANDB_API_KEY`` is set (``--no-wandb`` for a CSV logger only). ``--save DIR`` writes the
fine-tuned model in Hugging Face format (for ``xattn-lightning compare``). ``--timed-manifest``
(a manifest with a ``words`` column of true word timings) makes those utterances the monitor's
probes, so each reading also logs word-timestamp accuracy (``xattn/timestamps/mae_ms``);
``--export-alignment-heads`` writes the heads the monitor chose into the saved generation config.
``--lora R`` fine-tunes LoRA adapters of rank R (peft) instead of all weights; ``--save`` then writes
the adapter directory, which ``xattn-lightning compare BASE DIR`` loads onto its base model.
``--alignment-loss W`` (a training manifest with a ``words`` column) adds ``W`` times ``xl.AlignmentLoss``:
the chosen heads' cross-attention is trained towards the true word timings, and the heads are written
into the model's generation config at the end (so ``--save`` keeps them for ``return_token_timestamps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import xattn_lightning as xl
from xattn_lightning import XAttnSaliencyMonitor  # <-- xattn_lightning
from xattn_lightning.audio import read_manifest
from xattn_lightning.errors import XAttnError
from xattn_lightning.loading import features_batch, load_hf_model, tokenize_labels
from xattn_lightning.loggers import wandb_logger


class ManifestDataset(Dataset):
    """Rows of a TSV manifest (audio is read in the collator)."""

    def __init__(self, manifest: str | Path) -> None:
        self.rows = read_manifest(manifest)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class WhisperCollator:
    """Rows → ``input_features``, ``attention_mask``, ``labels`` (-100 padded), ``id``, ``text``."""

    def __init__(self, processor, decoder_start_id: int) -> None:
        self.processor = processor
        self.decoder_start_id = decoder_start_id

    def __call__(self, rows):
        batch = features_batch(self.processor, rows)
        labels = tokenize_labels(self.processor, [r.text for r in rows])
        if bool((labels[:, 0] == self.decoder_start_id).all()):
            labels = labels[:, 1:]  # the model prepends the start token itself when shifting labels
        batch["labels"] = labels
        batch["id"] = [r.id for r in rows]
        batch["text"] = [r.text for r in rows]
        return batch


class WhisperFineTuner(pl.LightningModule):
    """Seq2seq cross-entropy fine-tuning of a Hugging Face Whisper model (``self.model``)."""

    def __init__(
        self,
        model: str = "openai/whisper-tiny.en",
        lr: float = 1e-5,
        freeze_encoder: bool = False,
        lora: int = 0,
        alignment_loss: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.processor = load_hf_model(model)
        #: xl.AlignmentLoss over the chosen heads, set by main() when --alignment-loss > 0
        self.align: xl.AlignmentLoss | None = None
        if alignment_loss:  # the loss needs the attention weights: eager attention (SDPA returns none)
            self.model.set_attn_implementation("eager")
        self.model.train()
        if freeze_encoder:
            self.model.model.encoder.requires_grad_(False)
        if lora:  # parameter-efficient: LoRA adapters on the attention queries and values only
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
            self.model = get_peft_model(self.model, config)

    def _loss(self, batch, align: bool = False) -> torch.Tensor:
        align = align and self.align is not None and "words" in batch
        out = self.model(
            input_features=batch["input_features"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            output_attentions=align,
        )
        if not align:
            return out.loss
        assert self.align is not None
        extra = self.align(out.cross_attentions, batch["labels"], batch["words"])  # <-- the alignment loss
        self.log("train_alignment_loss", extra, batch_size=len(batch["labels"]))
        return out.loss + self.hparams.alignment_loss * extra

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, align=True)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Fine-tune Whisper with XAttnSaliencyMonitor.")
    ap.add_argument("--model", default="openai/whisper-tiny.en", help="hub id or local HF directory")
    ap.add_argument("--manifest", required=True, help="training TSV (id, audio, text)")
    ap.add_argument("--val-manifest", help="validation TSV (default: the training manifest)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--freeze-encoder", action="store_true")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: fine-tune all weights; needs peft)")
    ap.add_argument("--limit-train-batches", type=float, default=1.0)
    ap.add_argument("--limit-val-batches", type=float, default=1.0)
    ap.add_argument("--num-probes", type=int, default=4)
    ap.add_argument("--methods", default="encoder_spes", help="comma-separated saliency methods")
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
    ap.add_argument("--timed-manifest", help="probes with true word timings (a 'words' column)")
    ap.add_argument("--export-alignment-heads", action="store_true")
    ap.add_argument(
        "--alignment-loss",
        type=float,
        default=0.0,
        help="weight of xl.AlignmentLoss (training manifest with a 'words' column); its heads are exported at the end",
    )
    ap.add_argument(
        "--alignment-heads",
        default="supervised",
        help="heads the alignment loss trains: 'supervised' (chosen by their own error on up to 8 timed training "
        "utterances), 'model' (the checkpoint's alignment_heads) or 'L:H,L:H,...'",
    )
    ap.add_argument("--out", default="runs/finetune_whisper")
    ap.add_argument("--save", help="write the fine-tuned model here (Hugging Face format)")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--accelerator", default="auto")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    module = WhisperFineTuner(
        args.model, lr=args.lr, freeze_encoder=args.freeze_encoder, lora=args.lora, alignment_loss=args.alignment_loss
    )
    collate = WhisperCollator(module.processor, module.model.config.decoder_start_token_id)
    train_set = ManifestDataset(args.manifest)
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    if args.alignment_loss:
        heads = _alignment_loss_heads(args.alignment_heads, module, train_set, collate)
        module.align = xl.AlignmentLoss(module.model, heads, tokenizer=module.processor)
    val = DataLoader(
        ManifestDataset(args.val_manifest or args.manifest), batch_size=args.batch_size, collate_fn=collate
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loggers: list = [pl.loggers.CSVLogger(out, name="csv")]
    if not args.no_wandb:
        loggers.append(wandb_logger(save_dir=out))
    monitor = XAttnSaliencyMonitor(  # <-- xattn_lightning
        every_n_epochs=1,
        num_probes=args.num_probes,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        n_masks=args.n_masks,
        seed=args.seed,
        max_overhead=args.max_overhead,
        probes=DataLoader(ManifestDataset(args.timed_manifest), batch_size=1, collate_fn=collate)
        if args.timed_manifest
        else None,
        export_alignment_heads=args.export_alignment_heads,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        callbacks=[monitor],
        logger=loggers,
        accelerator=args.accelerator,
        default_root_dir=out,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, val)
    if module.align is not None:
        print(f"alignment loss: trained heads {module.align.heads} -> {module.align.export()}")
    if args.save:
        module.model.save_pretrained(args.save)
        module.processor.save_pretrained(args.save)
    for lg in loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            lg.experiment.finish()
    return {"history": monitor.history, "head_ranking": monitor.head_ranking, "trainer": trainer, "out": out}


def _alignment_loss_heads(choice: str, module: WhisperFineTuner, data: ManifestDataset, collate) -> list[list[int]]:
    """The heads --alignment-heads names."""
    if choice == "model":
        heads = xl.adapter_for(module.model, module.processor).alignment_heads()
        if not heads:
            raise XAttnError("--alignment-heads model: this checkpoint has no alignment_heads; use 'supervised'.")
        return heads
    if choice == "supervised":
        timed = [r for r in data.rows if r.words is not None][:8]
        if not timed:
            raise XAttnError("--alignment-loss needs a training manifest with a 'words' column (true word timings).")
        return xl.alignment_heads(module.model, [collate([r]) for r in timed], tokenizer=module.processor)
    try:
        return [[int(x) for x in pair.split(":")] for pair in choice.split(",")]
    except ValueError:
        raise XAttnError(f"--alignment-heads {choice!r}: expected 'supervised', 'model' or 'L:H,L:H,...'.") from None


if __name__ == "__main__":
    try:
        main()
    except XAttnError as err:
        sys.exit(f"error: {err}")
