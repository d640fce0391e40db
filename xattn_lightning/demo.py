"""The embedded demo: a synthetic speech-like task, a tiny Transformer S2T and the monitor.

Tokens are rendered as distinct time-frequency patterns (two frequency bands per token, a
token-specific duration) with noise, so a model must learn to align tokens with time.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xattn_lightning.testing import TinyS2T

START, EOS, PAD = 1, 2, 0


class SyntheticSpeech(Dataset):
    """Utterances of 2-5 tokens; token ``k`` lights up frequency bands ``k`` and ``k + n/2`` for
    ``3 + k % 4`` frames, with Gaussian noise. Deterministic per index and seed.

    >>> ds = SyntheticSpeech(4, vocab_size=10, num_mel_bins=16)
    >>> item = ds[0]; item["input_features"].shape[1], item["labels"][-1].item()
    (16, 2)
    """

    def __init__(self, size: int, vocab_size: int = 12, num_mel_bins: int = 16, seed: int = 0, noise: float = 0.3):
        self.size, self.vocab, self.bins, self.seed, self.noise = size, vocab_size, num_mel_bins, seed, noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 100003 + idx)
        n = int(torch.randint(2, 6, (1,), generator=g))
        toks = torch.randint(3, self.vocab, (n,), generator=g)
        frames = []
        for k in toks.tolist():
            length = 3 + k % 4
            seg = torch.zeros(length, self.bins)
            seg[:, k % self.bins] = 2.0
            seg[:, (k + self.bins // 2) % self.bins] = 1.5
            frames += [seg, torch.zeros(1, self.bins)]
        x = torch.cat(frames) + self.noise * torch.randn(sum(f.shape[0] for f in frames), self.bins, generator=g)
        return {"input_features": x, "labels": torch.cat([toks, torch.tensor([EOS])]), "id": f"syn{idx:04d}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad to the longest utterance: features with 0, labels with -100 (HF convention)."""
    t = max(i["input_features"].shape[0] for i in items)
    s = max(i["labels"].shape[0] for i in items)
    feats = torch.zeros(len(items), t, items[0]["input_features"].shape[1])
    mask = torch.zeros(len(items), t, dtype=torch.long)
    labels = torch.full((len(items), s), -100, dtype=torch.long)
    for b, it in enumerate(items):
        n = it["input_features"].shape[0]
        feats[b, :n], mask[b, :n] = it["input_features"], 1
        labels[b, : it["labels"].shape[0]] = it["labels"]
    return {"input_features": feats, "attention_mask": mask, "labels": labels, "id": [i["id"] for i in items]}


class DemoModule(pl.LightningModule):
    """A LightningModule around :class:`TinyS2T`, trained with teacher-forced cross-entropy."""

    def __init__(self, vocab_size: int = 12, num_mel_bins: int = 16, lr: float = 3e-3, **model_kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyS2T(vocab_size=vocab_size, num_mel_bins=num_mel_bins, **model_kwargs)
        self.xattn_adapter = TinyS2T.adapter(self.model)

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        labels = batch["labels"]
        dec_in = torch.cat([torch.full_like(labels[:, :1], START), labels[:, :-1].clamp(min=PAD)], 1)
        logits = self.model(batch["input_features"], dec_in)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=batch["labels"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def loaders(
    train_size: int = 256, val_size: int = 16, batch_size: int = 16, **kw: Any
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of the synthetic task (validation never shuffled)."""
    train = DataLoader(
        SyntheticSpeech(train_size, seed=1, **kw), batch_size=batch_size, shuffle=True, collate_fn=collate
    )
    val = DataLoader(SyntheticSpeech(val_size, seed=2, **kw), batch_size=batch_size, shuffle=False, collate_fn=collate)
    return train, val
