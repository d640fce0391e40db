"""Checkpoints whose chosen layers' cross-attention is wrong on purpose, to test whether a head-set rule escapes
"every head" on a model where every head is the worst set (issue 33's second Whisper: upper half 60 ms, every
head 92 ms, plain DTW): a short fine-tune that keeps the transcription loss and adds ``xl.AlignmentLoss`` pulling
every head of ``--layers`` towards word spans moved ``--shift`` seconds late (``--mode lag``), early (``early``),
or onto the first 60 ms (``sink``).

    python -m benchmarks.adversarial_heads --model openai/whisper-tiny.en \\
        --train voiceA/manifest.tsv,voiceB/manifest.tsv --mode lag --shift 0.25 --layers 0,1 --out ckpt/adv_lag

Only the decoder trains (the encoder is frozen and its outputs computed once), AdamW at ``--lr`` for ``--epochs``
over the training rows (the last ``--holdout`` rows of each manifest are left out), batch ``--batch-size``, seed 0;
the model and its processor are saved with ``save_pretrained``. docs/timestamps.md ("A model whose every head is
bad") gives the six checkpoints built this way and what each head-set rule chose on them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.loading import features_batch, load_hf_model, tokenize_labels


def moved(words, mode: str, shift: float, duration: float) -> list[tuple[str, float, float]]:
    """The word spans the chosen heads are trained towards: ``lag`` (later by ``shift``), ``early`` (earlier),
    ``sink`` (every word on the first 60 ms)."""
    out = []
    for unit, s, e in words:
        if mode == "lag":
            s, e = min(s + shift, duration), min(e + shift, duration + 0.02)
        elif mode == "early":
            s, e = max(s - shift, 0.0), max(e - shift, 0.02)
        else:
            s, e = 0.0, 0.06
        out.append((unit, s, max(e, s + 0.02)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True, help="comma-separated manifests with a words column")
    ap.add_argument("--mode", choices=["lag", "early", "sink"], default="lag")
    ap.add_argument("--shift", type=float, default=0.25, help="seconds, for lag and early")
    ap.add_argument("--layers", default="0,1", help="comma-separated decoder layers whose every head is misled")
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the alignment loss")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    model, proc = load_hf_model(args.model)
    model.config._attn_implementation = "eager"  # cross-attention weights with gradients
    rows = []
    for m in args.train.split(","):
        rr = read_manifest(m)
        rows += rr[: len(rr) - args.holdout]
    if not rows or any(r.words is None for r in rows):
        ap.error("--train needs manifests with a words column")
    heads = [[int(li), h] for li in args.layers.split(",") for h in range(model.config.decoder_attention_heads)]
    align = xl.AlignmentLoss(model, heads, tokenizer=proc)
    for p in model.model.encoder.parameters():
        p.requires_grad_(False)
    model.eval()
    data = []
    with torch.no_grad():
        for i in range(0, len(rows), args.batch_size):
            rs = rows[i : i + args.batch_size]
            enc = model.model.encoder(features_batch(proc, rs)["input_features"]).last_hidden_state
            words = [moved(r.words, args.mode, args.shift, max(w[2] for w in r.words)) for r in rs]
            labels = tokenize_labels(proc, [r.text for r in rs])
            if bool((labels[:, 0] == model.config.decoder_start_token_id).all()):
                labels = labels[:, 1:]  # the model prepends the start token itself
            data.append((enc, labels, words))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    log = []
    for epoch in range(args.epochs):
        random.shuffle(data)
        ce = al = 0.0
        for enc, labels, words in data:
            out = model(encoder_outputs=(enc,), labels=labels, output_attentions=True)
            extra = align(out.cross_attentions, labels, words)
            loss = out.loss + args.weight * extra
            opt.zero_grad()
            loss.backward()
            opt.step()
            ce, al = ce + float(out.loss.detach()), al + float(extra.detach())
        log.append({"epoch": epoch, "ce": ce / len(data), "alignment": al / len(data)})
        print(json.dumps(log[-1]), flush=True)
    model.eval()
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    (Path(args.out) / "adversarial_heads.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
