"""Validation of the corrected headline ρ(CA, SM) and the choice of its reliability floor.

For each utterance (synthetic espeak and real human recordings), encoder-output saliency at a few
small mask counts N (several seeds each) is compared with a large-N reference: raw and corrected
ρ(CA, SM_H), the split-half reliability, and the corrected value's distance to the reference.

    python -m benchmarks.reliability_floor --model $XL_WHISPER_PATH \
        --manifest $XL_ESPEAK_MANIFEST:5 --manifest $XL_HUMAN_MANIFEST:7 --out docs/reliability_floor

Writes ``<out>.json`` (every reading) and ``<out>.md`` (the tables), and prints them. The floor is
the lowest reliability from which, for every reading at or above it, the mean distance of the
corrected ρ to the reference stays within ``--tolerance`` (0.05).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.loading import features_batch, load_hf_model

METHOD = "encoder_spes"


def reading(model, batch, target, n: int, seed: int, sampling: str = "plain", smoothing: int = 0) -> dict:
    (e,) = xl.explain(
        model, batch, targets=[target], methods=(METHOD,), n_masks=n, seed=seed, sampling=sampling, smoothing=smoothing
    )
    return {
        "n": n,
        "seed": seed,
        "raw": e.agreement(METHOD),
        "reliability": e.reliability(METHOD),
        "corrected": e.agreement(METHOD, corrected=True),
        "seconds": e.results[METHOD].seconds,
    }


def choose_floor(readings: list[dict], tolerance: float) -> float:
    """Lowest reliability r such that readings with reliability >= r have mean |corrected - ref| <= tolerance
    (and so does every higher cut)."""
    ok = [r for r in readings if not math.isnan(r["reliability"]) and not math.isnan(r["abs_diff"])]
    cuts = sorted({math.floor(r["reliability"] * 100) / 100 for r in ok})  # each cut keeps its own reading
    floor = math.nan
    for cut in reversed(cuts):
        above = [r["abs_diff"] for r in ok if r["reliability"] >= cut]
        if not above:  # the cut rounded up past the most reliable reading
            continue
        if statistics.fmean(above) <= tolerance:
            floor = cut
        else:
            break
    return floor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", action="append", required=True, help="PATH[:COUNT], repeatable")
    ap.add_argument("--ns", default="32,64,128,256")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ref-n", type=int, default=2000)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--sampling", default="plain", help="mask design of the small-N readings (the reference is plain)")
    ap.add_argument(
        "--smoothing", type=int, default=0, help="encoder_spes smoothing= of every reading, the reference's too"
    )
    ap.add_argument("--out", default="docs/reliability_floor")
    args = ap.parse_args(argv)
    model, proc = load_hf_model(args.model)
    rows = []
    for spec in args.manifest:
        path, _, count = spec.partition(":")
        kind = Path(path).parent.name
        rows += [(kind, r) for r in read_manifest(path)[: int(count) if count else None]]
    ns = [int(x) for x in args.ns.split(",")]
    utts, readings = [], []
    start = time.perf_counter()
    for kind, row in rows:
        batch = features_batch(proc, [row])
        (e,) = xl.explain(model, batch, targets="generate", tokenizer=proc)
        target = e.decoder_ids.tolist()
        ref = reading(model, batch, target, args.ref_n, seed=1000, smoothing=args.smoothing)
        u = {"id": row.id, "kind": kind, "tokens": int(e.token_ids.numel()), "ref": ref}
        for n in ns:
            for seed in range(args.seeds):
                r = reading(model, batch, target, n, seed, args.sampling, args.smoothing)
                r["id"], r["kind"] = row.id, kind
                r["abs_diff"] = abs(r["corrected"] - ref["corrected"])
                r["abs_diff_raw"] = abs(r["raw"] - ref["corrected"])
                readings.append(r)
        utts.append(u)
        print(f"{row.id}: ref corrected {ref['corrected']:.3f} (reliability {ref['reliability']:.3f}), "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    floor = choose_floor(readings, args.tolerance)
    lines = [
        f"# Corrected ρ(CA, SM_H) at small N against N = {args.ref_n} ({len(utts)} utterances, "
        f"{args.seeds} seeds, Whisper {Path(args.model).name}, sampling {args.sampling}, "
        f"smoothing {args.smoothing})",
        "",
        "| N | mean reliability | mean abs(corrected − ref) | mean abs(raw − ref) | mean seed spread of corrected "
        "| max seed spread |",
        "|---|---|---|---|---|---|",
    ]
    for n in ns:
        rs = [r for r in readings if r["n"] == n]
        spreads = []
        for u in utts:
            vals = [r["corrected"] for r in rs if r["id"] == u["id"] and not math.isnan(r["corrected"])]
            if len(vals) > 1:
                spreads.append(max(vals) - min(vals))
        rel = [r["reliability"] for r in rs if not math.isnan(r["reliability"])]
        diffs = [r["abs_diff"] for r in rs if not math.isnan(r["abs_diff"])]
        raw = [r["abs_diff_raw"] for r in rs if not math.isnan(r["abs_diff_raw"])]
        lines.append(
            f"| {n} | {statistics.fmean(rel):.3f} | {statistics.fmean(diffs):.3f} | {statistics.fmean(raw):.3f} | "
            f"{statistics.fmean(spreads):.3f} | {max(spreads):.3f} |"
        )
    big = max(ns)
    lines += [
        "",
        f"Per utterance at N = {big}:",
        "",
        f"| utterance | kind | tokens | ref ρ corrected (N = {args.ref_n}) | ref reliability | corrected at N = {big} "
        "(mean of seeds) | abs diff | seed spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for u in utts:
        vals = [r["corrected"] for r in readings if r["id"] == u["id"] and r["n"] == big]
        vals = [v for v in vals if not math.isnan(v)]
        mean = statistics.fmean(vals) if vals else math.nan
        lines.append(
            f"| {u['id']} | {u['kind']} | {u['tokens']} | {u['ref']['corrected']:.3f} | "
            f"{u['ref']['reliability']:.3f} | {mean:.3f} | {abs(mean - u['ref']['corrected']):.3f} | "
            f"{(max(vals) - min(vals)) if vals else math.nan:.3f} |"
        )
    lines += [
        "",
        "Distance of the corrected ρ to the reference by the reading's reliability:",
        "",
        "| reliability | readings | mean abs diff | max abs diff |",
        "|---|---|---|---|",
    ]
    edges = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.01]
    for lo, hi in zip(edges, edges[1:]):
        d = [r["abs_diff"] for r in readings if lo <= r["reliability"] < hi and not math.isnan(r["abs_diff"])]
        if d:
            lines.append(f"| {lo:.1f}–{min(hi, 1.0):.1f} | {len(d)} | {statistics.fmean(d):.3f} | {max(d):.3f} |")
    lines += ["", f"Chosen floor (tolerance {args.tolerance}): reliability >= {floor}", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"utterances": utts, "readings": readings, "floor": floor, "argv": argv}, indent=1, default=float)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
