"""The paper's measurements on a real Whisper checkpoint: ρ(CA, SM_X), ρ(CA, SM_H), per layer and per
layer × head, Spearman, the context-mixing gap, deletion AUC of attention vs SPES, and how stable
SPES maps are as the number of masks grows.

    python benchmarks/whisper_report.py --model openai/whisper-tiny.en --manifest data/manifest.tsv \
        --utterances 6 --n-masks 256 --out docs/whisper_report

Writes ``report.json`` (every number, per utterance) and ``report.md`` (the tables) into ``--out``.
The numbers committed in ``docs/whisper_report.md`` came from the command printed at its top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.faithfulness import faithfulness_curves
from xattn_lightning.functional import correlation, map_similarity
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.text import wer

METHODS = ("spes", "encoder_spes")
EXPLAINERS = ("attention", "spes:pooled", "spes", "encoder_spes")


def _mean(xs):
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def flat_map_rho(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson between the raw flattened maps (no per-token normalisation: per-token scale
    differences inflate it, which is why the per-token ρ is the stability criterion)."""
    return correlation(a.reshape(-1), b.reshape(-1))


def utterance_scores(e: xl.Explanation, alignment_heads) -> dict:
    out: dict = {"tokens": int(e.token_ids.numel()), "frames": e.num_frames, "text": e.text}
    for m in METHODS:
        out[m] = {
            "pearson": e.agreement(m),
            "spearman": e.agreement(m, metric="spearman"),
            "per_token_pearson": float(e.per_token_agreement(m).nanmean()),
            "last_layer": e.agreement(m, layers=[-1]),
            "layers": e.layer_agreement(m).tolist(),
            "grid": e.agreement_grid(m).tolist(),
            "alignment_heads": e.agreement(m, pairs=alignment_heads) if alignment_heads else float("nan"),
            "seconds": e.results[m].seconds,
            "n_masks": e.results[m].n_masks,
        }
    out["gap"] = out["encoder_spes"]["pearson"] - out["spes"]["pearson"]
    return out


def stability(model, proc, batch, target, ns, methods, seed_ref: int, base_seed: int, opts: dict) -> dict:
    """Map at N (seed ``base_seed``) vs map at max(N) with another seed, and ρ(CA, SM) at each N."""
    res: dict = {}
    n_ref = max(ns)
    for m in methods:
        (ref,) = xl.explain(model, batch, targets=target, methods=(m,), n_masks=n_ref, seed=seed_ref, **opts)
        rows = []
        for n in sorted(ns):
            (e,) = xl.explain(model, batch, targets=target, methods=(m,), n_masks=n, seed=base_seed, **opts)
            row = {
                "n": n,
                "per_token_rho_pooled": map_similarity(e.pooled(m), ref.pooled(m)),
                "flat_rho_pooled": flat_map_rho(e.pooled(m), ref.pooled(m)),
                "agreement": e.agreement(m),
                "seconds": e.results[m].seconds,
            }
            if e.saliency[m].dim() == 3:
                row["per_token_rho_full"] = map_similarity(e.saliency[m], ref.saliency[m])
            rows.append(row)
            print(f"  stability {m} N={n}: {row}", file=sys.stderr, flush=True)
        res[m] = {"reference_n": n_ref, "reference_agreement": ref.agreement(m), "rows": rows}
    return res


def markdown(report: dict) -> str:
    cfg, utts = report["config"], report["utterances"]
    L = len(utts[0]["spes"]["layers"])
    H = len(utts[0]["spes"]["grid"][0])
    lines = [
        "# Cross-attention vs saliency on Whisper — measured report",
        "",
        f"Command: `{cfg['command']}`  ",
        f"Model `{cfg['model_name']}`, {len(utts)} utterances of `{cfg['manifest_name']}`, targets = the model's "
        f"greedy output, SPES N = {cfg['n_masks']} (input) / {cfg['encoder_n_masks']} (encoder), seed {cfg['seed']}, "
        f"{cfg['wall_seconds'] / 60:.1f} min on {cfg['device']}.",
        f"Greedy WER on these utterances: {report['wer']:.1f} %.",
        "",
        "## Agreement, corpus means (per-utterance ρ on flattened I×T', paper normalisation)",
        "",
        "| | ρ(CA, SM_X) | ρ(CA, SM_H) | gap SM_H − SM_X |",
        "|---|---|---|---|",
    ]
    agg = report["aggregate"]
    for key, label in (
        ("pearson", "Pearson, all layers × heads averaged"),
        ("spearman", "Spearman, all layers × heads averaged"),
        ("per_token_pearson", "Pearson per token (mean over tokens)"),
        ("last_layer", "Pearson, last layer (head mean)"),
        ("alignment_heads", "Pearson, OpenAI alignment heads (mean)"),
        ("best_head", "Pearson, best single head"),
        ("mean_head", "Pearson, single heads on average"),
        ("worst_head", "Pearson, worst single head"),
    ):
        x, h = agg["spes"][key], agg["encoder_spes"][key]
        lines.append(f"| {label} | {_f(x)} | {_f(h)} | {_f(h - x)} |")
    lines += [
        "",
        "## Per layer (head-mean attention), Pearson",
        "",
        "| layer | ρ(CA, SM_X) | ρ(CA, SM_H) |",
        "|---|---|---|",
    ]
    for li in range(L):
        lines.append(f"| {li} | {_f(agg['spes']['layers'][li])} | {_f(agg['encoder_spes']['layers'][li])} |")
    for m, label in (("spes", "ρ(CA, SM_X)"), ("encoder_spes", "ρ(CA, SM_H)")):
        lines += [
            "",
            f"## Per layer × head, {label}, Pearson",
            "",
            "| layer \\ head | " + " | ".join(map(str, range(H))) + " |",
        ]
        lines.append("|---" * (H + 1) + "|")
        for li in range(L):
            lines.append(f"| {li} | " + " | ".join(_f(agg[m]["grid"][li][hi]) for hi in range(H)) + " |")
    dele = report["deletion"]
    lines += [
        "",
        f"## Deletion (WER vs reference, clipped at 100; fractions {dele['fractions'][0]:.2f}…{dele['fractions'][-1]:.2f} "
        f"step {dele['fractions'][1] - dele['fractions'][0]:.2f}; greedy re-decoding; higher = more faithful)",
        "",
        "| explanation used to rank the T×F cells | deletion AUC | insertion AUC (lower = better) |",
        "|---|---|---|",
    ]
    names = {
        "attention": "cross-attention (all layers × heads, T' broadcast to T×F)",
        "spes:pooled": "SM_X pooled to T' (2-D max) and broadcast",
        "spes": "SM_X at full T×F resolution",
        "encoder_spes": "SM_H (T', broadcast)",
    }
    for ex in dele["explainers"]:
        ins = dele["insertion"].get(ex, float("nan"))
        lines.append(
            f"| {names.get(ex, ex)} | {dele['deletion'][ex]:.1f} | {'n/a' if math.isnan(ins) else f'{ins:.1f}'} |"
        )
    st = report.get("stability")
    if st:
        lines += ["", f"## SPES stability as N grows (utterance `{st['utterance']}`)", ""]
        for m, res in st["methods"].items():
            lines += [
                f"{m}: map at N (seed {cfg['seed']}) vs map at N = {res['reference_n']} (seed {cfg['seed'] + 1}); "
                f"ρ(CA, SM) at the reference: {_f(res['reference_agreement'])}",
                "",
                "| N | per-token ρ (pooled) | per-token ρ (full T×F) | flattened raw ρ (pooled) | ρ(CA, SM) at N | seconds |",
                "|---|---|---|---|---|---|",
            ]
            for r in res["rows"]:
                lines.append(
                    f"| {r['n']} | {_f(r['per_token_rho_pooled'])} | {_f(r.get('per_token_rho_full', float('nan')))} | "
                    f"{_f(r['flat_rho_pooled'])} | {_f(r['agreement'])} | {r['seconds']:.1f} |"
                )
            lines.append("")
    lines += [
        "",
        "## Cost",
        "",
        f"SPES per utterance: {report['cost']['spes_seconds']:.1f} s for {cfg['n_masks']} masks "
        f"({report['cost']['spes_seconds_per_mask']:.3f} s/mask, one teacher-forced forward per mask); encoder SPES "
        f"{report['cost']['encoder_spes_seconds']:.1f} s for {cfg['encoder_n_masks']} masks "
        f"({report['cost']['encoder_spes_seconds_per_mask']:.4f} s/mask).",
        "",
    ]
    return "\n".join(lines)


def aggregate(utts: list[dict]) -> dict:
    agg: dict = {}
    for m in METHODS:
        d = {
            k: _mean([u[m][k] for u in utts])
            for k in ("pearson", "spearman", "per_token_pearson", "last_layer", "alignment_heads")
        }
        grids = torch.tensor([u[m]["grid"] for u in utts], dtype=torch.float64)
        grid = grids.nanmean(0)
        d["grid"] = grid.tolist()
        d["layers"] = torch.tensor([u[m]["layers"] for u in utts], dtype=torch.float64).nanmean(0).tolist()
        d["best_head"] = float(grid.max())
        d["worst_head"] = float(grid.min())
        d["mean_head"] = float(grid.mean())
        li, hi = divmod(int(grid.argmax()), grid.shape[1])
        d["best_head_index"] = [li, hi]
        agg[m] = d
    return agg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH", "openai/whisper-tiny.en"))
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--utterances", type=int, default=6, help="first N manifest rows")
    ap.add_argument("--n-masks", type=int, default=256)
    ap.add_argument("--encoder-n-masks", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deletion-step", type=float, default=0.1)
    ap.add_argument("--insertion", action="store_true", help="also insertion curves (doubles the re-decoding)")
    ap.add_argument("--stability-ns", default="32,64,128,256,512", help="input SPES N values ('' to skip)")
    ap.add_argument("--encoder-stability-ns", default="64,128,256,512,1000,2000,4000")
    ap.add_argument("--stability-utterance", type=int, default=0)
    ap.add_argument("--out", default="whisper_report")
    args = ap.parse_args(argv)
    if not args.manifest:
        ap.error("--manifest is required (or set XL_ESPEAK_MANIFEST)")
    torch.manual_seed(0)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, proc = load_hf_model(args.model)
    rows = read_manifest(args.manifest)[: args.utterances]
    heads = getattr(model.generation_config, "alignment_heads", None)
    heads = [tuple(h) for h in heads] if heads else None
    opts = {"tokenizer": proc}
    steps = int(round(1 / args.deletion_step))
    fractions = [i / steps for i in range(steps + 1)]
    utts, curves = [], []
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        batch = features_batch(proc, [r])
        (e,) = xl.explain(
            model, batch, targets="generate", methods=("spes",), n_masks=args.n_masks, seed=args.seed, **opts
        )
        (eh,) = xl.explain(
            model,
            batch,
            targets=e.decoder_ids.unsqueeze(0),
            methods=("encoder_spes",),
            n_masks=args.encoder_n_masks,
            seed=args.seed,
            **opts,
        )
        e.results.update(eh.results)
        s = utterance_scores(e, heads)
        s["id"], s["reference"] = r.id, r.text
        modes = ("deletion", "insertion") if args.insertion else ("deletion",)
        (c,) = faithfulness_curves(
            model,
            batch,
            [e],
            explainers=EXPLAINERS,
            modes=modes,
            fractions=fractions,
            references=[r.text],
            tokenizer=proc,
        )
        s["curves"] = {k: {"scores": v.scores, "auc": v.auc} for k, v in c.items()}
        curves.append(c)
        utts.append(s)
        print(
            f"[{i + 1}/{len(rows)}] {r.id}: ρX={s['spes']['pearson']:+.3f} ρH={s['encoder_spes']['pearson']:+.3f} "
            f"del(CA)={c['attention/deletion'].auc:.1f} del(SPES)={c['spes/deletion'].auc:.1f} "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        (out / "report.partial.json").write_text(json.dumps({"utterances": utts}, indent=1))
    report: dict = {
        "utterances": utts,
        "wer": wer([u["reference"] for u in utts], [u["text"] for u in utts]),
        "aggregate": aggregate(utts),
        "deletion": {
            "fractions": fractions,
            "explainers": list(EXPLAINERS),
            "deletion": {ex: _mean([c[f"{ex}/deletion"].auc for c in curves]) for ex in EXPLAINERS},
            "insertion": {ex: _mean([c[f"{ex}/insertion"].auc for c in curves]) for ex in EXPLAINERS}
            if args.insertion
            else {},
        },
        "cost": {
            "spes_seconds": _mean([u["spes"]["seconds"] for u in utts]),
            "spes_seconds_per_mask": _mean([u["spes"]["seconds"] / u["spes"]["n_masks"] for u in utts]),
            "encoder_spes_seconds": _mean([u["encoder_spes"]["seconds"] for u in utts]),
            "encoder_spes_seconds_per_mask": _mean(
                [u["encoder_spes"]["seconds"] / u["encoder_spes"]["n_masks"] for u in utts]
            ),
        },
    }
    ns = [int(x) for x in args.stability_ns.split(",") if x.strip()]
    ens = [int(x) for x in args.encoder_stability_ns.split(",") if x.strip()]
    if ns or ens:
        r = rows[args.stability_utterance]
        batch = features_batch(proc, [r])
        (e0,) = xl.explain(model, batch, targets="generate", **opts)
        target = e0.decoder_ids.unsqueeze(0)
        st = {}
        if ns:
            st.update(stability(model, proc, batch, target, ns, ("spes",), args.seed + 1, args.seed, opts))
        if ens:
            st.update(stability(model, proc, batch, target, ens, ("encoder_spes",), args.seed + 1, args.seed, opts))
        report["stability"] = {"utterance": r.id, "methods": st}
    report["config"] = {
        "command": "python benchmarks/whisper_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_name": Path(args.model).name,
        "manifest_name": Path(args.manifest).parent.name + "/" + Path(args.manifest).name,
        "n_masks": args.n_masks,
        "encoder_n_masks": args.encoder_n_masks,
        "seed": args.seed,
        "alignment_heads": heads,
        "device": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "report.md").write_text(md)
    (out / "report.partial.json").unlink(missing_ok=True)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
