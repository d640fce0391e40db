"""Checkpoints whose cross-attention differs from their base model's, to score word-timestamp head rules on
models they were not chosen on (``benchmarks/timestamps_models.py``): short full fine-tunes on timed speech.

    python -m benchmarks.timestamps_checkpoints --model openai/whisper-tiny.en \\
        --train voiceA/manifest.tsv --lr 1e-4 --steps 40 --out ckpt/ft_a

Each fine-tune trains every weight (encoder and decoder) with AdamW at a constant ``--lr`` on batches of
``--batch-size`` utterances drawn in a fixed order (``--seed``), on the transcripts only (no timing labels, no
alignment loss), then saves the model and its processor with ``save_pretrained`` (the shipped
``alignment_heads`` are kept in the generation config, as a user's fine-tune keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from xattn_lightning.audio import read_manifest
from xattn_lightning.loading import features_batch, load_hf_model


def labels_for(proc, texts: list[str]) -> torch.Tensor:
    """Label ids (prompt without the decoder start token, text, EOS), padded with -100."""
    tok = getattr(proc, "tokenizer", proc)
    seqs = [tok(" " + t.strip()).input_ids for t in texts]
    start = tok.convert_tokens_to_ids("<|startoftranscript|>")
    seqs = [s[1:] if s and s[0] == start else s for s in seqs]
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [-100] * (n - len(s)) for s in seqs])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--train", required=True, help="comma-separated manifests (id audio text ...)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("needs --model (or XL_WHISPER_PATH)")
    torch.manual_seed(args.seed)
    model, proc = load_hf_model(args.model)
    model.train()
    rows = [r for m in args.train.split(",") for r in read_manifest(m)]
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, t0, k = [], time.perf_counter(), 0
    for step in range(args.steps):
        idx = [order[(k + i) % len(order)] for i in range(args.batch_size)]
        k += args.batch_size
        batch = [rows[i] for i in idx]
        feats = features_batch(proc, batch)["input_features"]
        out = model(input_features=feats, labels=labels_for(proc, [r.text for r in batch]))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss))
        print(f"step {step} loss {losses[-1]:.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    info = {**vars(args), "losses": losses, "train_seconds": time.perf_counter() - t0}
    (out_dir / "finetune.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
