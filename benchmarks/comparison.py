"""Validation of checkpoint comparisons at the default settings (``n_masks="auto"``) against N = 2,000.

Three fine-tunes of Whisper tiny.en on the espeak set (full at two learning rates, LoRA), each run
with the monitor on at its defaults, are compared with the base model on held-out speech (human
recordings and espeak utterances no fine-tune saw). Every (checkpoint, seed, mask count) reading is
computed once and cached, and each pair "base against a fine-tune" is then assembled exactly as
``xattn-lightning compare`` does it: every checkpoint read at 256 masks, the count the less reliable
one needs (:func:`comparison_masks`, as ``compare`` chooses it), both read with that count, the
difference paired over the probes (:func:`xattn_lightning.summary.paired_differences`).

    python -m benchmarks.comparison --model $XL_WHISPER_PATH --train $XL_ESPEAK_MANIFEST \
        --human $XL_HUMAN_MANIFEST --out benchmarks/results/comparison

Writes ``<out>/readings/*.json`` (the cache), ``<out>/summary.json`` and ``docs/comparison.md`` (the
tables), and prints them. The goals (issue 21): a corrected headline for every checkpoint; per
checkpoint the seeds' spread <= 0.05; per pair the difference's seeds' spread <= 0.03, its sign right
wherever the N = 2,000 difference lies outside its own interval's zero, and each interval holding the
N = 2,000 value in >= 90 % of readings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from xattn_lightning.audio import read_manifest
from xattn_lightning.compare import compare_checkpoints
from xattn_lightning.compare_report import CheckpointResult
from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.scores import ProbeScores
from xattn_lightning.summary import Summary, paired_differences

METHOD = "encoder_spes"
KEY = f"{METHOD}/pearson_corrected"
REFERENCE_MASKS, REFERENCE_SEED = 2000, 99


def _write_manifest(path: Path, rows: list) -> Path:
    path.write_text("id\taudio\ttext\n" + "".join(f"{r.id}\t{Path(r.audio).resolve()}\t{r.text}\n" for r in rows))
    return path


def fine_tune(args: argparse.Namespace, out: Path, train: Path, probes: Path) -> dict[str, str]:
    """The three fine-tunes (skipped where already saved), with the monitor on at its defaults on the
    held-out probes; returns name -> directory, the base first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_whisper", Path(__file__).parent.parent / "examples/finetune_whisper.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    runs = {
        "full lr 5e-5": ["--lr", "5e-5"],
        "full lr 1e-5": ["--lr", "1e-5"],
        "LoRA r 8": ["--lora", "8", "--lr", "1e-3"],
    }
    ckpts = {"base": args.model}
    monitor: dict[str, list] = {}
    for name, extra in runs.items():
        where = out / "ckpts" / name.replace(" ", "_")
        ckpts[name] = str(where)
        if args.report_only or (where / "adapter_config.json").exists() or (where / "config.json").exists():
            continue
        start = time.perf_counter()
        res = ex.main(["--model", args.model, "--manifest", str(train), "--val-manifest", str(probes),
                       "--epochs", str(args.epochs), "--batch-size", "4", "--num-probes", "4",
                       "--max-overhead", "none", "--no-wandb", "--accelerator", "cpu", "--out", str(where) + "_run",
                       "--save", str(where), *extra])  # fmt: skip
        monitor[name] = [
            {k: v for k, v in h.items() if "encoder_spes/" in k or k in ("epoch", "xattn/seconds")}
            for h in res["history"]
        ]
        print(f"fine-tuned {name} in {time.perf_counter() - start:.0f} s; monitor: {monitor[name]}", flush=True)
    if monitor:
        (out / "monitor.json").write_text(json.dumps(monitor, indent=1))
    return ckpts


def reading(ckpt: str, name: str, rows: list, n: int, seed: int, cache: Path) -> CheckpointResult:
    path = cache / f"{name.replace(' ', '_')}__n{n}__seed{seed}.json"
    if path.exists():
        d = json.loads(path.read_text())
        probes = [ProbeScores.from_dict(p) for p in d["probes"]]
        return CheckpointResult(name, Summary(d["scalars"], {}, {}, probes=probes), d["wer"], d["seconds"])
    comp = compare_checkpoints([ckpt], rows, methods=(METHOD,), names=[name], n_masks=n, seed=seed, progress=False)
    (r,) = comp.results
    s = r.summary
    path.write_text(json.dumps({"scalars": s.scalars, "wer": r.wer, "probes": [p.to_dict() for p in s.probes],
                                "seconds": r.seconds}))  # fmt: skip
    print(f"  {name} N={n} seed={seed}: {KEY}={s.scalars.get(KEY, math.nan):.3f} "
          f"reliability={s.scalars[f'{METHOD}/reliability']:.2f} ({r.seconds:.0f} s)", flush=True)  # fmt: skip
    return r


def comparison_masks(results: list[CheckpointResult], measured_at: int) -> tuple[int, dict[str, dict[str, float]]]:
    """``n_masks="auto"`` of a comparison, as ``compare_checkpoints`` makes it: the largest rung any checkpoint's
    maps need (:func:`~xattn_lightning.functional.choose_n_masks`), and checkpoint -> method -> reliability."""
    measured = {r.name: {METHOD: r.summary.scalars.get(f"{METHOD}/reliability", math.nan)} for r in results}
    return max(choose_n_masks(measured_at, rel) for by_m in measured.values() for rel in by_m.values()), measured


def _spread(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) - min(finite) if len(finite) == len(values) and finite else math.nan


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the base model (HF Whisper directory)")
    ap.add_argument("--train", required=True, help="espeak manifest: the fine-tunes train on all but --held-out")
    ap.add_argument("--human", required=True, help="human recordings manifest (probes)")
    ap.add_argument("--held-out", type=int, default=4, help="espeak utterances kept out of training, as probes")
    ap.add_argument("--human-probes", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/comparison")
    ap.add_argument("--doc", default="docs/comparison.md")
    ap.add_argument("--report-only", action="store_true", help="no fine-tuning: the tables from the cached readings")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cache = out / "readings"
    cache.mkdir(parents=True, exist_ok=True)
    espeak = read_manifest(args.train)
    held = espeak[-args.held_out :]
    probes = read_manifest(args.human)[: args.human_probes] + held
    train = _write_manifest(out / "train.tsv", espeak[: -args.held_out])
    probe_manifest = _write_manifest(out / "probes.tsv", probes)
    ckpts = fine_tune(args, out, train, probe_manifest)
    names = list(ckpts)
    first = MASK_LADDER[0]
    readings: dict[tuple[str, int, int], CheckpointResult] = {}

    def get(name: str, n: int, seed: int) -> CheckpointResult:
        if (name, n, seed) not in readings:
            readings[name, n, seed] = reading(ckpts[name], name, probes, n, seed, cache)
        return readings[name, n, seed]

    ref = {name: get(name, REFERENCE_MASKS, REFERENCE_SEED) for name in names}
    pairs = []
    for other in names[1:]:
        ref_diff = paired_differences(ref["base"].summary.probes, ref[other].summary.probes, METHOD)
        per_seed = []
        for seed in args.seeds:
            n, measured = comparison_masks([get("base", first, seed), get(other, first, seed)], first)
            a, b = get("base", n, seed), get(other, n, seed)
            d = paired_differences(a.summary.probes, b.summary.probes, METHOD)
            raw_default = paired_differences(get("base", first, seed).summary.probes, get(other, first, seed).summary.probes, METHOD)
            per_seed.append({
                "seed": seed, "n_masks": n, "reliability_at_256": {k: v[METHOD] for k, v in measured.items()},
                "base": {k: a.summary.scalars.get(f"{METHOD}/{k}", math.nan) for k in ("pearson", "reliability", "pearson_corrected", "pearson_corrected_ci_low", "pearson_corrected_ci_high")},
                "other": {k: b.summary.scalars.get(f"{METHOD}/{k}", math.nan) for k in ("pearson", "reliability", "pearson_corrected", "pearson_corrected_ci_low", "pearson_corrected_ci_high")},
                "diff": d["pearson_corrected"].__dict__, "diff_raw": d["pearson"].__dict__,
                "raw_diff_at_256": raw_default["pearson"].value if raw_default["pearson"].comparable else math.nan,
                "raw_diff_at_256_unchecked": b_minus_a_raw(get("base", first, seed), get(other, first, seed)),
                "seconds": a.seconds + b.seconds + get("base", first, seed).seconds + get(other, first, seed).seconds,
            })  # fmt: skip
        pairs.append({"other": other, "reference": {
            "base": ref["base"].summary.scalars.get(KEY, math.nan), "other": ref[other].summary.scalars.get(KEY, math.nan),
            "base_reliability": ref["base"].summary.scalars[f"{METHOD}/reliability"],
            "other_reliability": ref[other].summary.scalars[f"{METHOD}/reliability"],
            "diff": ref_diff["pearson_corrected"].__dict__, "diff_raw": ref_diff["pearson"].__dict__,
        }, "seeds": per_seed})  # fmt: skip
    summary = {"probes": [r.id for r in probes], "checkpoints": ckpts, "pairs": pairs, "goals": goals(pairs)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    text = report(summary, out)
    Path(args.doc).write_text(text)
    print(text)
    return summary


def b_minus_a_raw(a: CheckpointResult, b: CheckpointResult) -> float:
    """What the table at the old default (256 masks) gave: the raw ρ of b minus that of a."""
    return b.summary.scalars[f"{METHOD}/pearson"] - a.summary.scalars[f"{METHOD}/pearson"]


def goals(pairs: list[dict]) -> dict:
    headline = [not math.isnan(s[side]["pearson_corrected"]) for p in pairs for s in p["seeds"] for side in ("base", "other")]
    spreads = {}
    for p in pairs:
        spreads[p["other"]] = _spread([s["other"]["pearson_corrected"] for s in p["seeds"]])
    spreads["base"] = max(_spread([s["base"]["pearson_corrected"] for s in p["seeds"]]) for p in pairs)
    diff_spreads = {p["other"]: _spread([s["diff"]["value"] for s in p["seeds"]]) for p in pairs}
    covered, signs, agree, agree_old = [], [], [], []
    for p in pairs:
        ref = p["reference"]
        for s in p["seeds"]:
            for side in ("base", "other"):
                lo, hi = s[side]["pearson_corrected_ci_low"], s[side]["pearson_corrected_ci_high"]
                covered.append(lo <= ref[side] <= hi)
            covered.append(s["diff"]["ci_low"] <= ref["diff"]["value"] <= s["diff"]["ci_high"])
            same = math.copysign(1, s["diff"]["value"]) == math.copysign(1, ref["diff"]["value"])
            agree.append(same)
            agree_old.append(math.copysign(1, s["raw_diff_at_256_unchecked"]) == math.copysign(1, ref["diff"]["value"]))
            if ref["diff"]["comparable"] and not ref["diff"]["ci_low"] <= 0 <= ref["diff"]["ci_high"]:
                signs.append(same)
    return {
        "headline_for_every_checkpoint": all(headline),
        "checkpoint_seed_spread": spreads,
        "difference_seed_spread": diff_spreads,
        "sign_right": f"{sum(signs)}/{len(signs)}",
        "sign_agrees": f"{sum(agree)}/{len(agree)}",
        "sign_agrees_old_default": f"{sum(agree_old)}/{len(agree_old)}",
        "intervals_holding_reference": sum(covered) / len(covered) if covered else math.nan,
    }


def report(summary: dict, out: Path) -> str:
    lines = [
        "# Comparing checkpoints at the defaults (`n_masks=\"auto\"`) against N = 2,000",
        "",
        "Made by `python -m benchmarks.comparison` (its docstring says how); the numbers are in",
        f"`{out}/summary.json`. Probes: {', '.join(summary['probes'])} (human recordings and espeak",
        "utterances that no fine-tune saw). Encoder-output saliency (`encoder_spes`), ρ corrected for the",
        "maps' noise (`pearson_corrected`, the headline); the reference is N = 2,000 masks, seed 99.",
        "",
        "| pair (base → fine-tune) | N=2,000: base / tuned (reliability) | N=2,000 difference [95 %] | seed | auto N | base / tuned at auto N | difference [95 %] | raw ρ difference at 256 masks (the old default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["pairs"]:
        ref = p["reference"]
        for i, s in enumerate(p["seeds"]):
            head = (
                f"base → {p['other']} | {ref['base']:.3f} / {ref['other']:.3f} ({ref['base_reliability']:.2f} / "
                f"{ref['other_reliability']:.2f}) | {_d(ref['diff'])}"
                if i == 0
                else " | | "
            )
            lines.append(
                f"| {head} | {s['seed']} | {s['n_masks']} | {s['base']['pearson_corrected']:.3f} / "
                f"{s['other']['pearson_corrected']:.3f} | {_d(s['diff'])} | {s['raw_diff_at_256_unchecked']:+.3f} |"
            )
    g = summary["goals"]
    lines += [
        "",
        "| goal | result |",
        "|---|---|",
        f"| a headline for every checkpoint and seed | {'yes' if g['headline_for_every_checkpoint'] else 'no'} |",
        "| per checkpoint, seeds' spread of the headline ≤ 0.05 | "
        + ", ".join(f"{k} {v:.3f}" for k, v in g["checkpoint_seed_spread"].items())
        + " |",
        "| per pair, seeds' spread of the difference ≤ 0.03 | "
        + ", ".join(f"{k} {v:.3f}" for k, v in g["difference_seed_spread"].items())
        + " |",
        f"| sign right where the N = 2,000 difference's interval excludes 0 | {g['sign_right']} (no N = 2,000 difference excludes 0 here) |",
        f"| sign of the difference as at N = 2,000, every reading | {g['sign_agrees']}; the raw ρ at the old default "
        f"(256 masks): {g['sign_agrees_old_default']} |",
        f"| intervals holding the N = 2,000 value (≥ 90 %) | {100 * g['intervals_holding_reference']:.0f} % |",
        "",
        "What a reading at the defaults costs: [costs.md](costs.md#what-n_masksauto-costs).",
        "",
    ]
    return "\n".join(lines)


def _d(d: dict) -> str:
    if not d["comparable"]:
        return f"not comparable ({d['reason']})"
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


if __name__ == "__main__":
    main()
