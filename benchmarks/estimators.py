"""Does a smarter estimator make encoder-output saliency (SM_H) converge with fewer masks?

Draws N masks twice (seeds 0 and 1) on one utterance, keeps every mask's per-token KL, and compares
estimators on prefixes of seed 0 against the full-N map of seed 1 (per-token Pearson, mean over
tokens): ``paper`` (mean KL over the masks occluding a frame, SPES), ``diff`` (occluded mean minus
kept mean), ``ridge`` (ridge regression of KL on the occlusion pattern, λ = 1 per mask).

    python -m benchmarks.estimators --model openai/whisper-tiny.en --manifest data/manifest.tsv --n 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.functional import map_similarity
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.saliency.perturbation import draw_keep_masks, kl_per_token

ESTIMATORS = ("paper", "diff", "ridge")


def estimate(keep: torch.Tensor, kl: torch.Tensor, kind: str, lam: float = 1.0) -> torch.Tensor:
    """Per-token frame relevance ``[I, T']`` from keep masks ``[N, T']`` and KL ``[N, I]``."""
    occ, kl = (~keep).double(), kl.double()
    if kind == "paper":
        return (kl.T @ occ) / occ.sum(0).clamp(min=1)
    if kind == "diff":
        kept = 1 - occ
        return (kl.T @ occ) / occ.sum(0).clamp(min=1) - (kl.T @ kept) / kept.sum(0).clamp(min=1)
    z, y = occ - occ.mean(0), kl - kl.mean(0)
    a = z.T @ z + lam * z.shape[0] * torch.eye(z.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, z.T @ y).T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=os.environ.get("XL_WHISPER_PATH"), required=not os.environ.get("XL_WHISPER_PATH")
    )
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--utterance", type=int, default=0)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--p-h", type=float, default=0.7)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    model, proc = load_hf_model(args.model)
    batch = features_batch(proc, [read_manifest(args.manifest)[args.utterance]])
    (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc)
    ad = xl.adapter_for(model)
    draws = {}
    with torch.inference_mode(False), ad.capture_context(), torch.no_grad():
        (u,) = ad.utterances(batch)
        dec_in, pred = e.decoder_ids[:-1], e.decoder_ids[1:]
        pos = (~ad.special_mask(pred)).nonzero().view(-1)
        ref = ad.forward(u.features.unsqueeze(0), dec_in, output_attentions=False)
        logp, enc, t = ref.logits[0].float().log_softmax(-1), ref.encoder_out, e.num_encoder_frames
        for seed in (0, 1):
            keep = draw_keep_masks(args.n, t, args.p_h, torch.Generator().manual_seed(seed))
            kls = []
            for i0 in range(0, args.n, 32):
                k = keep[i0 : i0 + 32]
                h = enc.expand(k.shape[0], -1, -1).clone()
                h[:, :t] *= k.unsqueeze(-1).to(h.dtype)
                kls.append(kl_per_token(logp, ad.decode(h, dec_in).logits, pos))
            draws[seed] = (keep, torch.cat(kls))
    refs = {k: estimate(*draws[1], k) for k in ESTIMATORS}
    rows = []
    print("N | " + " | ".join(ESTIMATORS) + "   (per-token ρ to the other seed's full-N map)")
    for n in [x for x in (64, 128, 256, 512, 1000, 2000, 4000) if x < args.n] + [args.n]:
        row = {
            "n": n,
            **{k: map_similarity(estimate(draws[0][0][:n], draws[0][1][:n], k), refs[k]) for k in ESTIMATORS},
        }
        rows.append(row)
        print(f"{n} | " + " | ".join(f"{row[k]:.3f}" for k in ESTIMATORS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators.json").write_text(json.dumps({"argv": argv or sys.argv[1:], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
