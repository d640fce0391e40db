"""Word-timestamp head sets across models: every candidate of ``xl.timestamps.HEAD_SETS`` and ``ENSEMBLES`` on each
model, which one the default's label-free criterion chose, and leave-one-model-out over the rules that pick a head set.

    python -m benchmarks.timestamps_models --models tiny.en=PATH,ft1=PATH2 --timed data/timed-en/manifest.tsv \\
        --conditions fast220=fast/manifest.tsv --snr 20,10 --out results/timestamps_models.json

For each model: its alignments of the ``--timed`` utterances; the first ``--select`` of them, read without their
word timings, are the unlabelled speech the candidates (``candidate_heads``, ``candidate_sets``) and the criterion
(``choose_heads_from``: each word's log-probability drop when its plain-DTW span is occluded) are computed on; the utterances from
``--first-scored`` on are scored (mean boundary error, ms, of the word units the transcript got right), each
candidate with plain DTW and with the default's duration prior and silences. Rules that pick a head set per model
(the fixed candidates, the default's criterion and two other label-free criteria) are compared
leave-one-model-out: for each model the rule with the lowest mean error on the *other* models is chosen and
scored on it. ``--conditions`` (more timed manifests, e.g. faster speech, every row scored) and ``--snr`` (white
noise added to the scored utterances) give, per model, the chosen heads with plain DTW against the default (item 3
of issue 33: the prior and silences never lose). Costs: seconds per utterance of a greedy decode, of the
default's pass, and of the choice (made once per model). Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import xattn_lightning as xl
from benchmarks.timestamps_noise import noisy
from xattn_lightning.audio import load_audio, read_manifest
from xattn_lightning.functional.alignment import DURATION_PRIOR
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.timestamps import TimingOptions, align, alignment_words, ensemble_words, timing_scores
from xattn_lightning.timestamps.choice import ENSEMBLES, HEAD_SETS, candidate_sets, choose_heads_from
from xattn_lightning.timestamps.occlusion import span_occluder


def silence_distance(a, head_sets, clip: float = 0.2) -> list[float]:
    """An alternative criterion: for each silent span inside the speech, the distance (s, clipped) from it to the
    nearest word boundary of DTW over ``head_sets`` (their boundaries averaged) with the duration prior (lower is
    better)."""
    w = ensemble_words(a, head_sets, timing=TimingOptions(duration_prior=DURATION_PRIOR))
    if len(w) < 2 or not a.silences:
        return []
    ends = [e for _, _, e in w[:-1]]
    lo, hi = w[0][2], w[-1][1]
    out = []
    for s0, s1 in a.silences:
        if s0 >= lo and s1 <= hi:
            out.append(min(clip, min(0.0 if s0 <= t <= s1 else min(abs(t - s0), abs(t - s1)) for t in ends)))
    return out


def energy_after_silences(a, head_sets) -> list[float]:
    """An alternative criterion: the input's level (z-scored over the speech) at the middle of each boundary
    between two words as the default places it (the duration prior, then the move to silences): inside the
    silence where a boundary moved to one, at the DTW boundary elsewhere."""
    w = ensemble_words(a, head_sets, timing=TimingOptions(duration_prior=DURATION_PRIOR, silence=True))
    if len(w) < 2 or a.energy is None:
        return []
    e, step = a.energy.double(), a.energy_frame_seconds
    speech = e[int(w[0][1] / step) : max(int(round(w[-1][2] / step)), int(w[0][1] / step) + 2)]
    mean, std = float(speech.mean()), float(speech.std()) or 1.0
    mids = [(w[k][2] + w[k + 1][1]) / 2 for k in range(len(w) - 1)]
    return [(float(e[min(int(round(t / step)), len(e) - 1)]) - mean) / std for t in mids]


def one_se_pick(values: dict[str, list[float]], sets: dict) -> str:
    """The one-standard-error rule of ``choose_heads_from`` over paired per-boundary values (lower is better) of
    the candidates ``sets`` (name: the head sets whose boundaries it averages)."""
    v = {n: torch.tensor(x, dtype=torch.float64) for n, x in values.items()}
    order = list(sets)
    lowest = min(v, key=lambda n: (float(v[n].mean()), order.index(n)))
    near = []
    for n in v:
        d = v[n] - v[lowest]
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
        if float(d.mean()) <= se + 1e-12:
            near.append(n)
    return min(near, key=lambda n: (-sum(len(h) for h in sets[n]), order.index(n)))


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def boundary_levels(a, words) -> list[float]:
    """The former default's criterion (before the span occlusion): the input's level (mean log-mel of each 10-ms
    frame, z-scored over the speech) at each boundary between two of ``words``; lower is better."""
    if len(words) < 2:
        return []
    e, step = a.energy.double(), a.energy_frame_seconds
    lo, hi = int(words[0][1] / step), int(round(words[-1][2] / step))
    speech = e[lo : max(hi, lo + 2)]
    mean, std = float(speech.mean()), float(speech.std())
    std = std if std > 0 else 1.0
    return [(float(e[min(int(round(end / step)), len(e) - 1)]) - mean) / std for _, _, end in words[:-1]]


def plain_energy(a, head_sets) -> list[float]:
    """The level at the boundaries of plain DTW (the criterion of the default before the span occlusion)."""
    return boundary_levels(a, ensemble_words(a, head_sets))


def prior_energy(a, head_sets) -> list[float]:
    """The former default's criterion: the input's level at the boundaries of DTW with the duration prior."""
    return boundary_levels(a, ensemble_words(a, head_sets, timing=TimingOptions(duration_prior=DURATION_PRIOR)))


def criteria(sel, sets) -> dict[str, dict[str, float]]:
    """Another label-free criterion's values per candidate on the selection utterances (lower is better)."""
    return {
        "distance from silences to boundaries, lowest": {
            n: _mean([x for a in sel for x in silence_distance(a, hs)]) for n, hs in sets.items()
        },
    }


def score(aligns, refs, head_sets, refined: bool) -> float:
    prior, silence = (DURATION_PRIOR, True) if refined else (0.0, False)
    timing = TimingOptions(duration_prior=prior, silence=silence)
    pred = [ensemble_words(a, head_sets, timing=timing) for a in aligns]
    return timing_scores(pred, refs)["mae_ms"]


def aligns_of(model, proc, rows, snr: float | None = None, seed: int = 0, features: list | None = None):
    """Each row's alignment (one pass); with ``features`` (a list), each utterance's model input is appended to it."""
    rng = np.random.default_rng(seed)
    ad = xl.adapter_for(model, proc)
    out = []
    for r in rows:
        if snr is None:
            b = features_batch(proc, [r])
        else:
            wav = noisy(load_audio(r.audio).numpy(), snr, rng)
            b = dict(proc.feature_extractor(wav, sampling_rate=16000, return_tensors="pt", return_attention_mask=True))
        with torch.no_grad():
            out += align(model, b, tokenizer=proc)
        if features is not None:  # as the model takes it ([T, F], padding included), what span_contrast encodes
            features += [u.features for u in ad.utterances(ad.model_batch(b))]
    return out


def measure(name: str, path: str, args) -> dict:
    model, proc = load_hf_model(path)
    model.eval()
    rows = read_manifest(args.timed)
    sel_rows, scored_rows = rows[: args.select], rows[args.first_scored :]
    refs = [r.words for r in scored_rows]
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in scored_rows[: args.cost_utterances]:
            model.generate(features_batch(proc, [r])["input_features"], max_new_tokens=128)
    greedy_s = (time.perf_counter() - t0) / args.cost_utterances
    t0 = time.perf_counter()
    sel_features: list = []
    sel = aligns_of(model, proc, sel_rows, features=sel_features)
    sel_pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shipped = getattr(model.generation_config, "alignment_heads", None)
    ad = xl.adapter_for(model, proc)
    contrast = span_occluder(ad, sel, sel_features)
    choice = choose_heads_from(sel, shipped, scores=contrast)
    choose_s = time.perf_counter() - t0
    in_place = span_occluder(ad, sel, sel_features, later=None)
    t0 = time.perf_counter()
    scored = aligns_of(model, proc, scored_rows)
    pass_s = (time.perf_counter() - t0) / len(scored_rows)
    candidates = choice.candidates
    sets = candidate_sets(candidates)
    t0 = time.perf_counter()
    timing = TimingOptions(duration_prior=DURATION_PRIOR, silence=True)
    for a in scored:
        ensemble_words(a, choice.head_sets, timing=timing)
    timing_s = (time.perf_counter() - t0) / len(scored)
    other = criteria(sel, sets)
    former = {n: sets[n] for n in HEAD_SETS if n in sets}
    picks = {
        DEFAULT_RULE: choice.name,
        "span contrast, highest": choose_heads_from(sel, shipped, tolerance=0.0, scores=contrast).name,
        "span contrast, one-SE rule": choose_heads_from(sel, shipped, tolerance=1.0, scores=contrast).name,
        FORMER_OCCLUSION_RULE: choose_heads_from(sel, shipped, tolerance=1.0, scores=in_place).name,
        FORMER_LEVEL_RULE: one_se_pick({n: [x for a in sel for x in plain_energy(a, hs)] for n, hs in sets.items()}, sets),
        **{k: min(v, key=lambda n: (v[n], n)) for k, v in other.items()},
        "boundary energy with the duration prior, one-SE rule": one_se_pick(
            {n: [x for a in sel for x in prior_energy(a, hs)] for n, hs in sets.items()}, sets
        ),
        FORMER_RULE: one_se_pick({n: [x for a in sel for x in prior_energy(a, hs)] for n, hs in former.items()}, former),
        "boundary energy after the silences, one-SE rule": one_se_pick(
            {n: [x for a in sel for x in energy_after_silences(a, hs)] for n, hs in sets.items()}, sets
        ),
    }
    out: dict = {
        "path": path,
        "shape": list(sel[0].cross_attention.shape[:2]),
        "chosen": choice.name,
        "candidates": candidates,
        "ensembles": {n: list(parts) for n, parts in ENSEMBLES.items() if n in sets},
        "criterion": choice.scores,
        "criterion_higher_is_better": True,
        "criterion_standard_errors": choice.standard_errors,
        "other_criteria": other,
        "rule_picks": picks,
        "plain_ms": {n: score(scored, refs, hs, False) for n, hs in sets.items()},
        "default_ms": {n: score(scored, refs, hs, True) for n, hs in sets.items()},
        "boundaries": timing_scores([alignment_words(a) for a in scored], refs)["boundaries"],
        "cost": {
            "greedy_decode_s_per_utt": greedy_s,
            "default_pass_s_per_utt": pass_s,
            "default_timing_s_per_utt": timing_s,
            "choice_once_s": sel_pass_s + choose_s,
            "choice_criterion_s": choose_s,
            "choice_utterances": len(sel),
        },
        "conditions": {},
    }
    conds = [(k, read_manifest(m), None) for k, m in (c.split("=", 1) for c in args.conditions.split(",") if c)]
    conds += [(f"timed-en held out, {snr:g} dB SNR", scored_rows, snr) for snr in args.snr_values]
    for label, crow, snr in conds:
        al = aligns_of(model, proc, crow, snr, args.seed)
        cref = [r.words for r in crow]
        out["conditions"][label] = {
            n: {"plain_ms": score(al, cref, hs, False), "default_ms": score(al, cref, hs, True)}
            for n, hs in sets.items()
        }
    print(name, json.dumps({k: out[k] for k in ("chosen", "criterion", "plain_ms", "default_ms", "cost")}), flush=True)
    return out


#: the rule word_timestamps' default follows
DEFAULT_RULE = "span contrast, half-SE rule (the default)"
#: the default before the contrast: the drop in place alone, one-SE rule
FORMER_OCCLUSION_RULE = "span occlusion in place, one-SE rule (the default before the contrast)"
#: the default before the span occlusion: the input's level at the plain-DTW boundaries, one-SE rule
FORMER_LEVEL_RULE = "boundary energy, one-SE rule (the default before the span occlusion)"
#: the default before the ensemble: the four head sets, the level at the boundaries of DTW with the duration prior
FORMER_RULE = "the former default: head sets only, boundary energy with the prior, one-SE rule"


def rule_picks(models: dict) -> dict[str, dict[str, str]]:
    """Which candidate each rule picks on each model (fixed rules pick themselves; ``model`` falls back to the
    upper half, as openai-whisper does, on a model without heads)."""
    picks: dict[str, dict[str, str]] = {}
    for fixed in next(iter(models.values()))["default_ms"]:
        picks[f"always {fixed}"] = {m: fixed if fixed in r["default_ms"] else "upper_half" for m, r in models.items()}
    for rule in next(iter(models.values()))["rule_picks"]:
        picks[rule] = {m: r["rule_picks"][rule] for m, r in models.items()}
    return picks


def leave_one_model_out(models: dict, key: str = "default_ms") -> dict:
    """Per model: the rule with the lowest mean error on the other models, its pick and error on this one."""
    picks = rule_picks(models)
    out = {}
    for held in models:
        others = [m for m in models if m != held]

        def mean_err(rule: str, ms: list[str]) -> float:
            return sum(models[m][key][picks[rule][m]] for m in ms) / len(ms)

        rule = min(picks, key=lambda r: (mean_err(r, others), r))
        out[held] = {
            "rule": rule,
            "pick": picks[rule][held],
            "error_ms": models[held][key][picks[rule][held]],
            "rule_mean_on_others_ms": mean_err(rule, others),
            "default_pick": models[held]["chosen"],
            "default_error_ms": models[held][key][models[held]["chosen"]],
            "best_simple_ms": min(models[held][key][n] for n in ("all", "upper_half", "model") if n in models[held][key]),
        }
    return {"picks": picks, "per_model": out}


def tolerance_pick(r: dict, tolerance: float) -> str:
    """What ``choose_heads_from`` picks at ``tolerance`` standard errors, from one model's recorded criterion."""
    c, se = r["criterion"], r["criterion_standard_errors"]
    sizes = {n: len(h) for n, h in r["candidates"].items()}
    sizes.update({n: sum(sizes[m] for m in members) for n, members in r.get("ensembles", {}).items()})
    order = list(c)
    if math.isinf(tolerance):
        return min(c, key=lambda n: (-sizes[n], order.index(n)))
    sign = -1.0 if r.get("criterion_higher_is_better") else 1.0  # reports before the span occlusion: lower is better
    best = min(c, key=lambda n: (round(sign * c[n], 9), order.index(n)))
    near = [n for n in c if sign * (c[n] - c[best]) <= tolerance * se[n] + 1e-12]
    return min(near, key=lambda n: (-sizes[n], order.index(n)))


def tolerance_table(reports: dict[str, dict], tolerances: tuple[float, ...] = (0, 0.5, 1, 1.5, 2, 3, math.inf)) -> str:
    """Per tolerance of the one-SE rule and per report (models on some speech): models at or below their best simple
    rule, the mean error of the picks, and their mean gap to the best simple rule (prior + silences)."""
    lines = ["| tolerance (SE) | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for tol in tolerances:
        cells = []
        for report in reports.values():
            models = report["models"].values()
            picks = [(r["default_ms"][tolerance_pick(r, tol)], min(r["default_ms"][n] for n in ("all", "upper_half", "model") if n in r["default_ms"])) for r in models]
            ok = sum(e <= b + 1e-9 for e, b in picks)
            cells.append(f"{ok} of {len(picks)}; {sum(e for e, _ in picks) / len(picks):.1f} ms ({sum(e - b for e, b in picks) / len(picks):+.1f})")
        lines.append(f"| {'always the candidate with most heads' if tol == math.inf else f'{tol:g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The tables of docs/timestamps.md ("A head set per model") from a report."""
    models = report["models"]
    names = list(dict.fromkeys(n for r in models.values() for n in r["default_ms"]))
    lines = [
        "| model | " + " | ".join(f"{n}: plain / default" for n in names) + " | default chose | boundaries |",
        "|---" * (len(names) + 3) + "|",
    ]
    for m, r in models.items():
        cells = []
        for n in names:
            if n not in r["default_ms"]:
                cells.append("–")
                continue
            cell = f"{r['plain_ms'][n]:.1f} / {r['default_ms'][n]:.1f}"
            cells.append(f"**{cell}**" if n == r["chosen"] else cell)
        best = min(r["default_ms"][n] for n in ("all", "upper_half", "model") if n in r["default_ms"])
        gap = r["default_ms"][r["chosen"]] - best
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r['chosen']} ({gap:+.1f} ms vs the best simple rule) | {r['boundaries']} |")
    means = [sum(r["default_ms"][n] for r in models.values()) / len(models) for n in names if all(n in r["default_ms"] for r in models.values())]
    if len(means) == len(names):
        chosen = sum(r["default_ms"][r["chosen"]] for r in models.values()) / len(models)
        best = sum(min(r["default_ms"][n] for n in ("all", "upper_half", "model") if n in r["default_ms"]) for r in models.values()) / len(models)
        lines.append("| mean | " + " | ".join(f"{x:.1f}" for x in means) + f" | {chosen:.1f} (best simple rule of each: {best:.1f}) | |")
    for key in ("leave_one_model_out", "leave_one_model_out_plain"):
        if key not in report:
            continue
        lines += ["", f"{key}:", "", "| held-out model | rule chosen on the others | its pick | error | default's pick | error | best simple rule |", "|---|---|---|---|---|---|---|"]
        for m, x in report[key]["per_model"].items():
            lines.append(
                f"| {m} | {x['rule']} | {x['pick']} | {x['error_ms']:.1f} ms | {x['default_pick']} | {x['default_error_ms']:.1f} ms | {x['best_simple_ms']:.1f} ms |"
            )
    conds = sorted({c for r in models.values() for c in r["conditions"]})
    if conds:
        lines += ["", "| model | condition | chosen heads: plain DTW | default (prior + silences) |", "|---|---|---|---|"]
        for m, r in models.items():
            for c in conds:
                x = r["conditions"][c][r["chosen"]]
                lines.append(f"| {m} | {c} | {x['plain_ms']:.1f} ms | {x['default_ms']:.1f} ms |")
    lines += ["", "| model | greedy decode s/utt | default pass s/utt | choice once (its passes + criterion) s | criterion alone s |", "|---|---|---|---|---|"]
    for m, r in models.items():
        c = r["cost"]
        lines.append(
            f"| {m} | {c['greedy_decode_s_per_utt']:.2f} | {c['default_pass_s_per_utt']:.2f} | {c['choice_once_s']:.1f} | {c['choice_criterion_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated NAME=PATH (Hugging Face Whisper directories)")
    ap.add_argument("--timed", default=os.environ.get("XL_TIMED_MANIFEST"), help="manifest with a words column")
    ap.add_argument("--select", type=int, default=8, help="first utterances, unlabelled, to choose on")
    ap.add_argument("--first-scored", type=int, default=12)
    ap.add_argument("--conditions", default="", help="comma-separated NAME=MANIFEST of more timed speech to score")
    ap.add_argument("--snr", default="", help="comma-separated SNRs (dB) of white noise on the scored utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost-utterances", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/timestamps_models.json")
    ap.add_argument("--markdown", help="print the tables of an existing report and exit")
    ap.add_argument("--tolerances", help="comma-separated NAME=REPORT: the one-SE rule's picks at other tolerances, and exit")
    ap.add_argument("--previous", help="a report of the same settings whose models are reused, not measured again")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.tolerances:
        reports = {k: json.loads(Path(v).read_text()) for k, v in (x.split("=", 1) for x in args.tolerances.split(","))}
        print(tolerance_table(reports))
        return 0
    if not (args.models and args.timed):
        ap.error("needs --models and --timed (or XL_TIMED_MANIFEST)")
    if args.select > args.first_scored:
        ap.error("--select must not reach the scored utterances (--first-scored)")
    args.snr_values = [float(x) for x in args.snr.split(",") if x]
    previous = json.loads(Path(args.previous).read_text())["models"] if args.previous else {}
    models = {}
    for spec in args.models.split(","):
        name, path = spec.split("=", 1)
        models[name] = previous[name] if name in previous else measure(name, path, args)
    report: dict = {"argv": argv or sys.argv[1:], "models": models, "threads": torch.get_num_threads()}
    if args.previous:
        report["reused_from"] = {"path": args.previous, "models": [m for m in models if m in previous]}
    if len(models) > 1:
        report["leave_one_model_out"] = leave_one_model_out(models)
        report["leave_one_model_out_plain"] = leave_one_model_out(models, "plain_ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
