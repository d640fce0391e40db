"""Can a mask's KL cost less arithmetic and keep the maps? (issue 34, item 2)

A mask's decoder pass spends about half its time projecting the explained positions onto Whisper's
51,864-word vocabulary, which the KL normalises over. The candidate measured here keeps the KL's
formula and changes only how the logits are made: the whole vocabulary in bfloat16 (this CPU's AMX
units, about 3.5x a float32 matrix product), and the ``top`` tokens of the unmasked distribution (which
carry its mass, found once per probe) recomputed exactly in float32. The rest is bounded: where every
tail logit is within ``δ`` of its exact value, the KL moves by at most ``δ`` times the tail's mass under
either distribution.

For every probe, the same masks (the monitor's: ``encoder_spes``, seed 0, ``p_h`` 0.7, plain) are scored
both ways from the same masked hidden states, so the two maps differ only by the formula. Reported: the
per-token Pearson between the new and the exact maps (median and minimum over all tokens of all probes),
the corrected headline (``encoder_spes/pearson_corrected``) of both, and the seconds of the vocabulary
term (projection + KL) per mask both ways, side by side in one run, with the seconds of a whole mask.

    python -m benchmarks.kl_fidelity --model $XL_WHISPER_PATH --manifest $XL_ESPEAK_MANIFEST \
        --human $XL_HUMAN_MANIFEST --espeak 4 --n-masks 1024
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
from xattn_lightning.functional import per_token_correlation
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.saliency import SaliencyResult
from xattn_lightning.saliency.perturbation import _Accumulator, draw_keep_masks, kl_per_token, rows_batch_size
from xattn_lightning.saliency.vocabulary import VOCABULARY_TOP, bf16_logits
from xattn_lightning.scores import probe_scores
from xattn_lightning.summary import summarize


def top_tokens(logp_ref: torch.Tensor, k: int) -> torch.Tensor:
    """``[P, k]`` ids of the ``k`` most probable tokens of each explained position (unmasked)."""
    return logp_ref.topk(k, dim=-1).indices


def approx_kl(logp_ref: torch.Tensor, h: torch.Tensor, w16: torch.Tensor, w: torch.Tensor, top: torch.Tensor | None):
    """KL(P_ref || P_masked) per mask and position, ``[B, P]``, from the masked hidden states ``h``
    ``[B, P, d]``: the logits in bfloat16, the ``top`` tokens' ``[P, k]`` recomputed in float32
    (:func:`~xattn_lightning.saliency.vocabulary.bf16_logits`, what ``vocabulary="bf16"`` runs)."""
    if top is None or top.numel() == 0:
        return kl_per_token(logp_ref, torch.matmul(h.to(torch.bfloat16), w16.T))
    return kl_per_token(logp_ref, bf16_logits(h, w, w16, top))


def time_vocabularies(model, proc, rows, n_masks: int, repeats: int) -> dict:
    """Mask-loop seconds of ``encoder_spes`` with ``vocabulary="exact"`` and ``"bf16"``, interleaved per probe."""
    secs: dict[str, float] = {"exact": 0.0, "bf16": 0.0}
    for _ in range(repeats):
        for _, row in rows:
            batch = features_batch(proc, [row])
            for vocab in ("exact", "bf16"):
                (e,) = xl.explain(model, batch, methods=("encoder_spes",), n_masks=n_masks, vocabulary=vocab)
                secs[vocab] += float(e.results["encoder_spes"].seconds)
    masks = n_masks * len(rows) * repeats
    return {
        **{f"{k}_ms_per_mask": 1000 * v / masks for k, v in secs.items()},
        "exact_over_bf16": secs["exact"] / secs["bf16"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--human", default=os.environ.get("XL_HUMAN_MANIFEST"))
    ap.add_argument("--espeak", type=int, default=4, help="espeak probes (the first ones)")
    ap.add_argument("--humans", type=int, default=100, help="human recordings (all by default)")
    ap.add_argument("--n-masks", type=int, default=1024)
    ap.add_argument("--top", default=f"0,{VOCABULARY_TOP}", help="exact tokens per position of each variant")
    ap.add_argument("--time-masks", type=int, default=256, help="masks per probe of the timing (0: no timing)")
    ap.add_argument("--time-repeats", type=int, default=2)
    ap.add_argument("--time-probes", type=int, default=4, help="probes of the timing (espeak and human alike)")
    ap.add_argument("--fidelity", type=int, default=1, help="0: only the timing")
    ap.add_argument("--out", default="benchmarks/results/kl_fidelity_cpu.json")
    args = ap.parse_args(argv)
    if not args.model or not args.manifest:
        ap.error("needs --model and --manifest (or XL_WHISPER_PATH / XL_ESPEAK_MANIFEST)")
    tops = [int(k) for k in args.top.split(",")]
    model, proc = load_hf_model(args.model)
    ad = xl.adapter_for(model, proc)
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    w16 = w.to(torch.bfloat16)
    rows = [("espeak", r) for r in read_manifest(args.manifest)[: args.espeak]]
    if args.human:
        rows += [("human", r) for r in read_manifest(args.human)[: args.humans]]
    per_token: dict[int, list[float]] = {k: [] for k in tops}
    scores: dict[str, list[dict]] = {"exact": [], **{f"top{k}": [] for k in tops}}
    seconds = {"mask": 0.0, "exact": 0.0, **{f"top{k}": 0.0 for k in tops}}
    probes = []
    t0 = time.perf_counter()
    half = args.time_probes // 2  # as many espeak as human probes
    timed = [r for r in rows if r[0] == "espeak"][:half] + [r for r in rows if r[0] == "human"][:half]
    timing = time_vocabularies(model, proc, timed, args.time_masks, args.time_repeats) if args.time_masks else {}
    if timing:
        print(f"  timing: {timing}", flush=True)
    for kind, row in rows if args.fidelity else []:
        batch = features_batch(proc, [row])
        (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc)
        with torch.inference_mode(False), torch.no_grad():
            (u,) = ad.utterances(batch)
            dec_in, pred = e.decoder_ids[:-1].to(ad.device), e.decoder_ids[1:]
            pos = (~ad.special_mask(pred)).nonzero().view(-1).to(ad.device)
            enc = ad.encode(u.features.unsqueeze(0))
            logp = ad.decode(enc, dec_in).logits[0].float().log_softmax(-1)[pos]
            run = ad.masked_decoder(enc, dec_in, positions=pos)
            seen: list[torch.Tensor] = []
            hook = head.register_forward_hook(lambda m, a, out, seen=seen: seen.append(a[0].detach()))
            t = e.num_encoder_frames
            keep_all = draw_keep_masks(args.n_masks, t, 0.7, torch.Generator().manual_seed(0 + 7919))
            accs = {name: _Accumulator(int(pos.numel()), t, torch.device("cpu")) for name in scores}
            tops_ids = {k: top_tokens(logp, k) if k else None for k in tops}
            try:
                for keep in keep_all.split(rows_batch_size(int(pos.numel()), args.n_masks)):
                    seen.clear()
                    s = time.perf_counter()
                    logits = run(keep)
                    seconds["mask"] += time.perf_counter() - s
                    h = seen[-1]
                    s = time.perf_counter()
                    kl = kl_per_token(logp, torch.matmul(h, w.T))  # the exact vocabulary term, timed alone
                    seconds["exact"] += time.perf_counter() - s
                    torch.testing.assert_close(kl, kl_per_token(logp, logits), rtol=1e-4, atol=1e-5)
                    accs["exact"].add(kl, ~keep)
                    for k in tops:
                        s = time.perf_counter()
                        kl_k = approx_kl(logp, h, w16, w, tops_ids[k])
                        seconds[f"top{k}"] += time.perf_counter() - s
                        accs[f"top{k}"].add(kl_k, ~keep)
            finally:
                hook.remove()
        maps = {}
        for name, acc in accs.items():
            e.results["encoder_spes"] = SaliencyResult(acc.result(), 0.0, halves=acc.halves(), n_masks=acc.n)
            maps[name] = e.saliency["encoder_spes"]
            r = probe_scores(e, ("encoder_spes",), ("pearson",), probe_id=row.id)
            scores[name].append(r)
        for k in tops:
            rho = per_token_correlation(maps[f"top{k}"], maps["exact"], "pearson", normalize=False)
            per_token[k] += [float(x) for x in rho if x == x]
        p_mass = {k: float(logp.exp().gather(-1, tops_ids[k]).sum(-1).min()) for k in tops if k}
        probes.append({"id": row.id, "kind": kind, "tokens": int(pos.numel()), "top_mass_min": p_mass})
        print(f"  {kind} {row.id}: {int(pos.numel())} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    n_masks_total = args.n_masks * len(rows)
    headline = {}
    if not args.fidelity:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": argv or sys.argv[1:], "timing": timing}, indent=1))
        return 0
    for name, rs in scores.items():
        s = summarize(rs, ("encoder_spes",), ("pearson",)).scalars
        headline[name] = {k: s.get(f"encoder_spes/{k}") for k in ("pearson", "pearson_corrected", "reliability")}
    report = {
        "argv": argv or sys.argv[1:],
        "n_masks": args.n_masks,
        "probes": probes,
        "headline": headline,
        "per_token_pearson": {
            f"top{k}": {"median": statistics.median(v), "min": min(v), "tokens": len(v)} for k, v in per_token.items()
        },
        "ms_per_mask": {k: 1000 * v / n_masks_total for k, v in seconds.items()},
        "timing": timing,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps({k: report[k] for k in ("headline", "per_token_pearson", "ms_per_mask")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
