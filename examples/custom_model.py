"""Train your own PyTorch encoder-decoder with Lightning, with XAttnSaliencyMonitor on.

The model below stands for "your model": a convolutional subsampler, a Transformer encoder and an
``nn.TransformerDecoder`` over characters, on Kaldi filterbanks read from a TSV manifest. The
monitor reaches its cross-attention through :class:`xattn_lightning.HookAdapter`, which needs only
the encoder's and the cross-attention modules' names. The lines that add the monitor are marked
``# <-- xattn_lightning``.

    python examples/custom_model.py --manifest train.tsv --epochs 30 --out runs/custom
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import xattn_lightning as xl  # <-- xattn_lightning
from xattn_lightning.audio import fbank, load_audio, read_manifest
from xattn_lightning.errors import XAttnError
from xattn_lightning.loggers import wandb_logger

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """Characters of the training texts; ids 0-2 are pad, start and end."""

    def __init__(self, texts: list[str]) -> None:
        self.chars = sorted({c for t in texts for c in t.lower()})
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str) -> list[int]:
        return [BOS] + [self.index[c] for c in text.lower() if c in self.index] + [EOS]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.chars[i - 3] if i >= 3 else ["<pad>", "<s>", "</s>"][i] for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


class Speech(Dataset):
    """80-bin normalised filterbanks and character ids, computed once."""

    def __init__(self, manifest: str | Path, tokenizer: CharTokenizer) -> None:
        self.rows = read_manifest(manifest)
        self.items = [(fbank(load_audio(r.audio)), torch.tensor(tokenizer.encode(r.text)), r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(items) -> dict:
    feats = nn.utils.rnn.pad_sequence([f for f, _, _ in items], batch_first=True)
    labels = nn.utils.rnn.pad_sequence([y for _, y, _ in items], batch_first=True, padding_value=-100)
    return {
        "input_features": feats,
        "lengths": torch.tensor([f.shape[0] for f, _, _ in items]),
        "labels": labels,
        "id": [r.id for _, _, r in items],
        "text": [r.text for _, _, r in items],
    }


class MySpeechModel(nn.Module):
    """``forward(features [B, T, 80], decoder_ids [B, S]) -> logits [B, S, V]``."""

    def __init__(
        self, vocab_size: int, d_model: int = 128, nhead: int = 4, layers: int = 2, max_len: int = 1024
    ) -> None:
        super().__init__()
        self.subsample = nn.Sequential(
            nn.Conv1d(80, d_model, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(d_model, d_model, 5, stride=2, padding=2),
        )
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, 0.1, batch_first=True),
            layers,
            enable_nested_tensor=False,
        )
        self.embed = nn.Embedding(vocab_size, d_model)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, nhead, 4 * d_model, 0.1, batch_first=True), layers
        )
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, features: Tensor, decoder_ids: Tensor) -> Tensor:
        x = self.subsample(features.transpose(1, 2)).transpose(1, 2)
        memory = self.encoder(x + self.pos[: x.shape[1]])
        s = decoder_ids.shape[1]
        y = self.embed(decoder_ids) * math.sqrt(self.embed.embedding_dim) + self.pos[:s]
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=y.device, dtype=y.dtype)
        return self.out(self.decoder(y, memory, tgt_mask=mask, tgt_is_causal=True))


class LitSpeech(pl.LightningModule):
    def __init__(self, vocab_size: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MySpeechModel(vocab_size)

    def _loss(self, batch) -> Tensor:
        labels = batch["labels"]
        inp = labels[:, :-1].clamp(min=0)  # -100 padding becomes pad id 0 on the input side
        logits = self.net(batch["input_features"], inp)
        return nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train a custom S2T model with XAttnSaliencyMonitor.")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--val-manifest")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-probes", type=int, default=4)
    ap.add_argument("--every-n-epochs", type=int, default=5)
    ap.add_argument("--methods", default="spes,encoder_spes")
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
    ap.add_argument("--limit-train-batches", type=float, default=1.0)
    ap.add_argument("--out", default="runs/custom_model")
    ap.add_argument("--no-wandb", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    tok = CharTokenizer([r.text for r in read_manifest(args.manifest)])
    train = Speech(args.manifest, tok)
    val = Speech(args.val_manifest, tok) if args.val_manifest else train
    module = LitSpeech(len(tok), lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loggers: list = [pl.loggers.CSVLogger(out, name="csv")]
    if not args.no_wandb:
        loggers.append(wandb_logger(save_dir=out))
    monitor = xl.XAttnSaliencyMonitor(  # <-- xattn_lightning
        every_n_epochs=args.every_n_epochs,
        num_probes=args.num_probes,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        model_fn=lambda m: xl.HookAdapter(
            m.net,
            encoder="encoder",
            cross_attention="decoder.layers.*.multihead_attn",
            decoder_start_id=BOS,
            eos_id=EOS,
            special_ids=(PAD,),
            input_key="input_features",
            tokenizer=tok,
        ),
        n_masks=args.n_masks,
        seed=args.seed,
        max_overhead=args.max_overhead,
        max_new_tokens=200,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        callbacks=[monitor],
        logger=loggers,
        default_root_dir=out,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module,
        DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate),
        DataLoader(val, batch_size=args.batch_size, collate_fn=collate),
    )
    for lg in loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            lg.experiment.finish()
    return {"history": monitor.history, "head_ranking": monitor.head_ranking, "trainer": trainer, "out": out}


if __name__ == "__main__":
    try:
        main()
    except XAttnError as err:
        sys.exit(f"error: {err}")
