"""How much a word's log-probability drops when the encoder frames of its *true* span are occluded, with the span
moved earlier or later: the shape the default's head-set criterion (``xl.timestamps.span_contrast``: the drop in
place less the drop 100 ms later) rests on.

    python -m benchmarks.span_profile --models tiny.en=$XL_WHISPER_PATH --timed $XL_TIMED_MANIFEST \\
        --out benchmarks/results/span_profile_cpu.json

For every utterance whose transcript's words (lower-cased, letters, digits and apostrophes) are exactly the
manifest's words (its merged entries such as "in the" split, each part given the entry's span), each word's span is
zeroed in the encoder output (as encoder SPES' masks, through the adapter's ``masked_decoder``) at each shift of
``--shifts`` seconds, and the drop of the word's teacher-forced log-probability (nats, summed over its tokens) is
kept; the report gives the mean per shift and model (docs/timestamps.md, "Early heads: the span contrast").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.functional.alignment import group_words
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.timestamps import CHOICE_MAX_WORDS, align
from xattn_lightning.timestamps.occlusion import _Occlusion


def _norm(w: str) -> str:
    return re.sub(r"[^a-z0-9']", "", w.lower())


def profile(path: str, manifest: str, shifts: list[float]) -> dict:
    """The mean drop per shift over the words of the utterances whose transcript matches the manifest's words."""
    model, proc = load_hf_model(path)
    model.eval()
    ad = xl.adapter_for(model, proc)
    rows = read_manifest(manifest)
    drops: list[list[float]] = []
    used = 0
    for r in rows:
        b = features_batch(proc, [r])
        with torch.no_grad():
            a = align(model, b, tokenizer=proc)[0]
        true = [(_norm(t), s0, s1) for w, s0, s1 in r.words for t in w.split()]
        groups = group_words(a.pieces)
        if [t for t, _, _ in true] != [_norm("".join(a.pieces[i] for i in g)) for g in groups[:CHOICE_MAX_WORDS]]:
            continue
        used += 1
        with torch.no_grad():
            occlusion = _Occlusion(ad, a, ad.encode(ad.utterances(ad.model_batch(b))[0].features.unsqueeze(0)))
        frames = occlusion.frames
        for k, (_, s0, s1) in enumerate(true):
            spans = []
            for d in shifts:
                f0 = min(max(int((s0 + d) / a.frame_seconds), 0), frames - 1)
                spans.append((k, f0, min(max(int(round((s1 + d) / a.frame_seconds)), f0 + 1), frames)))
            drops.append(occlusion.occlude(spans))
    if not drops:
        raise SystemExit(f"{path}: no transcript matched the manifest's words; nothing to measure.")
    mean = torch.tensor(drops).mean(0).tolist()
    return {"path": path, "utterances": used, "words": len(drops), "mean_drop_nats": dict(zip(map(str, shifts), mean))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="comma-separated NAME=PATH (Hugging Face Whisper directories)")
    ap.add_argument("--timed", default=os.environ.get("XL_TIMED_MANIFEST"), help="manifest with a words column")
    ap.add_argument("--shifts", default="-0.2,-0.1,-0.05,0,0.05,0.1,0.2", help="seconds, later when positive")
    ap.add_argument("--out", default="benchmarks/results/span_profile.json")
    args = ap.parse_args(argv)
    if not args.timed:
        ap.error("give --timed (or set XL_TIMED_MANIFEST): a manifest with a words column")
    torch.manual_seed(0)
    shifts = [float(x) for x in args.shifts.split(",")]
    report: dict = {"timed": args.timed, "shifts_s": shifts, "models": {}, "argv": sys.argv[1:] if argv is None else argv}
    for spec in args.models.split(","):
        name, _, path = spec.partition("=")
        report["models"][name] = profile(path, args.timed, shifts)
        m = report["models"][name]
        print(name, m["words"], " ".join(f"{x:5.2f}" for x in m["mean_drop_nats"].values()), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
