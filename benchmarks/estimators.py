"""Fewer masks for the same encoder-output saliency map (SM_H): mask designs × estimators.

For each utterance, a reference map from ``--ref-n`` plain masks (the SPES estimator, its own
seed); then, for every mask design (``plain``, ``balanced``: each frame occluded in exactly
round(p·N) masks, ``sobol``: scrambled Sobol points; see ``draw_keep_masks``) and every N, two
seeds of N masks, each scored with every estimator: ``paper`` (SPES: mean KL of the masks that
occlude a frame), ``diff`` (occluded mean minus kept mean: the kept masks as a control variate),
``ridge`` (ridge regression of KL on the occlusion pattern, λ = 1 per mask), ``smooth`` (the same
regression with a prior that neighbouring encoder frames have similar relevance: a penalty on
first differences in time, ``--smooth`` per mask), ``paper_smooth`` (the SPES map filtered in time
with a [1, 2, 1] / 4 kernel), ``cv_attention`` and ``cv_index`` (control variates: the paper's
estimator on KL − g plus E[g | frame occluded] from 10,000 simulated masks, where g is a per-token
least-squares fit of KL on a surrogate of the mask: exp(−λ·s) for a few λ and s itself, s the kept
share of the token's cross-attention (``cv_attention``) or of its map from the other half of the
masks (``cv_index``, cross-fitted); unbiased for the paper's map whatever the surrogate). Reported: per-token Pearson to the reference (mean over tokens and
utterances; the goal is ≥ 0.9 with ≤ 1,000 masks), how far ρ(CA, SM_H) moves between the two
seeds, and the ceiling the reference's own noise puts on the first number: the per-token
correlation an unlimited number of masks could reach, √(split-half reliability of the reference,
Spearman-Brown corrected).

    python -m benchmarks.estimators --model openai/whisper-tiny.en --manifest data/manifest.tsv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.functional import agreement, map_similarity
from xattn_lightning.functional.agreement import per_token_correlation
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.saliency.perturbation import draw_keep_masks, kl_per_token

ESTIMATORS = ("paper", "diff", "ridge", "smooth", "paper_smooth")
#: further estimators, asked for by name (``--estimators``): control variates with a surrogate
CONTROL_VARIATES = ("cv_attention", "cv_index")
#: the decay rates λ of the surrogate's features exp(−λ·s)
CV_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)
CV_SIMULATED_MASKS = 10_000
#: binomial smoothing kernels in time, by width
KERNELS = {3: (1, 2, 1), 5: (1, 4, 6, 4, 1), 7: (1, 6, 15, 20, 15, 6, 1)}
DESIGNS = ("plain", "balanced", "sobol")


def _control_variate(keep: torch.Tensor, kl: torch.Tensor, weights: torch.Tensor, p_h: float) -> torch.Tensor:
    """The paper's map of ``KL − g`` plus ``E[g | frame occluded]``; ``g`` fitted per token on
    features of ``s = kept share of weights [I, T']``."""
    occ, kl = (~keep).double(), kl.double()
    w = weights.to(keep.device).double().clamp(min=0)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)

    def features(k: torch.Tensor) -> torch.Tensor:  # [N, I, F]
        s = k.double() @ w.T / (1.0 - p_h)
        return torch.stack([torch.exp(-r * s) for r in CV_RATES] + [s], -1)

    x = features(keep)
    xc, y = x - x.mean(0), kl - kl.mean(0)
    beta = torch.linalg.lstsq(xc.permute(1, 0, 2), y.T.unsqueeze(-1)).solution.squeeze(-1)  # [I, F]
    g = (x * beta).sum(-1)
    base = ((kl - g).T @ occ) / occ.sum(0).clamp(min=1)
    sim = draw_keep_masks(CV_SIMULATED_MASKS, keep.shape[1], p_h, torch.Generator().manual_seed(12345))
    sim = sim.to(keep.device)
    s_occ = (~sim).double()
    g_sim = (features(sim) * beta).sum(-1)
    return base + (g_sim.T @ s_occ) / s_occ.sum(0).clamp(min=1)


def estimate(
    keep: torch.Tensor,
    kl: torch.Tensor,
    kind: str,
    lam: float = 1.0,
    smooth: float = 4.0,
    attention: torch.Tensor | None = None,
    p_h: float = 0.7,
) -> torch.Tensor:
    """Per-token frame relevance ``[I, T']`` from keep masks ``[N, T']`` and KL ``[N, I]``.

    ``kind``: ``paper``, ``diff``, ``ridge``, ``smooth`` (or ``smooth:<weight>``), ``paper_smooth``
    (or ``paper_smooth:<width>``, a binomial kernel of width 3, 5 or 7), ``cv_attention`` (needs
    ``attention [I, T']``), ``cv_index``."""
    kind, _, arg = kind.partition(":")
    if kind == "cv_attention":
        if attention is None:
            raise ValueError("cv_attention needs the tokens' cross-attention")
        return _control_variate(keep, kl, attention, p_h)
    if kind == "cv_index":  # each half's surrogate from the other half's map (cross-fitting)
        a, b = slice(0, None, 2), slice(1, None, 2)
        ma, mb = estimate(keep[a], kl[a], "paper"), estimate(keep[b], kl[b], "paper")
        return (_control_variate(keep[a], kl[a], mb, p_h) + _control_variate(keep[b], kl[b], ma, p_h)) / 2
    occ, kl = (~keep).double(), kl.double()
    if kind == "paper":
        return (kl.T @ occ) / occ.sum(0).clamp(min=1)
    if kind == "paper_smooth":
        m = ((kl.T @ occ) / occ.sum(0).clamp(min=1)).unsqueeze(1)
        taps = torch.tensor(KERNELS[int(arg or 3)], dtype=m.dtype, device=m.device)
        half = len(taps) // 2
        padded = torch.nn.functional.pad(m, (half, half), mode="replicate")
        return torch.nn.functional.conv1d(padded, (taps / taps.sum()).view(1, 1, -1)).squeeze(1)
    if arg:
        smooth = float(arg)
    if kind == "diff":
        kept = 1 - occ
        return (kl.T @ occ) / occ.sum(0).clamp(min=1) - (kl.T @ kept) / kept.sum(0).clamp(min=1)
    z, y = occ - occ.mean(0), kl - kl.mean(0)
    t = z.shape[1]
    penalty = torch.eye(t, dtype=torch.float64, device=z.device)
    if kind == "smooth":
        d = torch.diff(torch.eye(t, dtype=torch.float64, device=z.device), dim=0)  # first differences [T'-1, T']
        penalty = penalty + smooth * d.T @ d
    a = z.T @ z + lam * z.shape[0] * penalty
    return torch.linalg.solve(a, z.T @ y).T


def reference_ceiling(keep: torch.Tensor, kl: torch.Tensor) -> float:
    """√(Spearman-Brown reliability) of the reference map from its even and odd masks, mean over
    tokens: the highest per-token ρ any estimate can reach against this noisy reference."""
    a = estimate(keep[0::2], kl[0::2], "paper").float().cpu()
    b = estimate(keep[1::2], kl[1::2], "paper").float().cpu()
    r = per_token_correlation(a, b, "pearson", False)
    r = r[~r.isnan()]
    return float((2 * r / (1 + r)).clamp(min=0).sqrt().mean())


def _kls(run, keep: torch.Tensor, logp: torch.Tensor, pos: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for i0 in range(0, keep.shape[0], batch):
        out.append(kl_per_token(logp, run(keep[i0 : i0 + batch]).float(), pos))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--utterances", type=int, default=4)
    ap.add_argument("--ns", default="64,128,256,512,1000")
    ap.add_argument("--ref-n", type=int, default=4000)
    ap.add_argument("--p-h", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--smooth", type=float, default=4.0, help="weight of the smoothness prior (estimator smooth)")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help="e.g. paper,smooth:16,paper_smooth:5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not args.model or not args.manifest:
        ap.error("needs --model and --manifest (or XL_WHISPER_PATH / XL_ESPEAK_MANIFEST)")
    ns = [int(x) for x in args.ns.split(",")]
    model, proc = load_hf_model(args.model, device=args.device)
    ad = xl.adapter_for(model)
    t0 = time.perf_counter()
    # per (design, n, estimator): per-token rho of both seeds, per utterance; rho(CA, SM) of both seeds
    sim: dict = {}
    spread: dict = {}
    ceilings: list[float] = []
    designs = [d for d in args.designs.split(",") if d]
    estimators = [k for k in args.estimators.split(",") if k]
    for row in read_manifest(args.manifest)[: args.utterances]:
        batch = features_batch(proc, [row])
        (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc)
        ca = e.attention()
        with torch.inference_mode(False), torch.no_grad():
            (u,) = ad.utterances(batch)
            dec_in, pred = e.decoder_ids[:-1].to(ad.device), e.decoder_ids[1:]
            pos = (~ad.special_mask(pred)).nonzero().view(-1).to(ad.device)
            enc = ad.encode(u.features.unsqueeze(0))
            logp = ad.decode(enc, dec_in).logits[0].float().log_softmax(-1)
            run = ad.masked_decoder(enc, dec_in)
            t = e.num_encoder_frames
            gen = torch.Generator().manual_seed(10_000)
            keep = draw_keep_masks(args.ref_n, t, args.p_h, gen).to(ad.device)
            ref_kl = _kls(run, keep, logp, pos, args.batch)
            ref = estimate(keep, ref_kl, "paper").float().cpu()
            ceilings.append(reference_ceiling(keep, ref_kl))
            for design in designs:
                for n in ns:
                    rhos: dict = {k: [] for k in estimators}
                    for seed in (0, 1):
                        keep = draw_keep_masks(n, t, args.p_h, torch.Generator().manual_seed(seed), design)
                        keep = keep.to(ad.device)
                        kl = _kls(run, keep, logp, pos, args.batch)
                        for k in estimators:
                            m = estimate(keep, kl, k, smooth=args.smooth, attention=ca, p_h=args.p_h).float().cpu()
                            sim.setdefault((design, n, k), []).append(map_similarity(m, ref))
                            rhos[k].append(agreement(ca, m))
                    for k in estimators:
                        spread.setdefault((design, n, k), []).append(abs(rhos[k][0] - rhos[k][1]))
        print(f"  {row.id} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    ceiling = statistics.fmean(ceilings)
    print(f"per-token ρ to a {args.ref_n}-mask plain map | mean |Δρ(CA, SM_H)| between two seeds")
    print(f"ceiling set by the reference's own noise (√ reliability): {ceiling:.3f}")
    print("design    N     " + "  ".join(f"{k:>13s}" for k in estimators))
    for design in designs:
        for n in ns:
            r = {"design": design, "n": n}
            cells = []
            for k in estimators:
                r[f"{k}_per_token_rho"] = statistics.fmean(sim[(design, n, k)])
                r[f"{k}_seed_spread"] = statistics.fmean(spread[(design, n, k)])
                cells.append(f"{r[f'{k}_per_token_rho']:.3f} | {r[f'{k}_seed_spread']:.3f}")
            rows.append(r)
            print(f"{design:9s} {n:5d} " + "  ".join(cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "argv": argv or sys.argv[1:],
        "device": args.device,
        "utterances": args.utterances,
        "ref_n": args.ref_n,
        "smooth": args.smooth,
        "reference_ceiling": ceiling,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    (out / "estimators.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
