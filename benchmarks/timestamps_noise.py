"""Word timestamps under noise: the duration prior and the silences when the pauses are no longer silent.

    python -m benchmarks.timestamps_noise --model openai/whisper-tiny.en --timed data/timed-en/manifest.tsv \\
        --snr inf,30,20,10 --out results/

The timed utterances from ``--first-scored`` on, with white noise added at each signal-to-noise ratio (dB over
the whole utterance; ``inf``: clean), the noise drawn with a fixed seed. For each: plain DTW over every head,
with the duration prior, with the silences, with both (``xl.word_timestamps``' default), and how many silent
spans were found per utterance. The silences come from the input features with a threshold relative to each
utterance's own floor and median, so stationary noise should move the threshold, not the spans; this measures
whether it does. Writes ``timestamps_noise.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from xattn_lightning.audio import load_audio, read_manifest
from xattn_lightning.functional.alignment import DURATION_PRIOR
from xattn_lightning.loading import load_hf_model
from xattn_lightning.timestamps import TimingOptions, align, alignment_words, timing_scores

VARIANTS = {
    "plain DTW, every head": (0.0, False),
    "duration prior": (DURATION_PRIOR, False),
    "silences": (0.0, True),
    "duration prior + silences (default)": (DURATION_PRIOR, True),
}


def noisy(wav: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``wav`` with white noise at ``snr_db`` dB below its mean power (unchanged for ``inf``).

    >>> x = np.ones(16000, dtype=np.float32)
    >>> y = noisy(x, 20.0, np.random.default_rng(0))
    >>> round(float(10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))))
    20
    """
    if math.isinf(snr_db):
        return wav
    power = float(np.mean(wav.astype(np.float64) ** 2))
    noise = rng.standard_normal(wav.shape) * math.sqrt(power / 10 ** (snr_db / 10))
    return (wav + noise).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--timed", default=os.environ.get("XL_TIMED_MANIFEST"), help="manifest with a words column")
    ap.add_argument("--first-scored", type=int, default=12)
    ap.add_argument("--snr", default="inf,30,20,10", help="signal-to-noise ratios (dB), comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not (args.model and args.timed):
        ap.error("needs --model and --timed (or XL_WHISPER_PATH / XL_TIMED_MANIFEST)")
    model, proc = load_hf_model(args.model)
    rows = read_manifest(args.timed)[args.first_scored :]
    if not rows or any(r.words is None for r in rows):
        ap.error(f"{args.timed} has no utterances with a words column from row {args.first_scored} on")
    clean = [load_audio(r.audio).numpy() for r in rows]
    refs = [r.words for r in rows]
    report: dict = {"model": Path(args.model).name, "utterances": len(rows), "rows": [], "argv": argv or sys.argv[1:]}
    for snr in [float(x) for x in args.snr.split(",")]:
        rng = np.random.default_rng(args.seed)
        aligns = []
        for wav in clean:
            feats = proc.feature_extractor(
                noisy(wav, snr, rng), sampling_rate=16000, return_tensors="pt", return_attention_mask=True
            )  # as loading.features_batch
            with torch.no_grad():
                aligns += align(model, dict(feats), tokenizer=proc)
        spans = float(np.mean([len(a.silences or []) for a in aligns]))
        for name, (prior, silence) in VARIANTS.items():
            timing = TimingOptions(duration_prior=prior, silence=silence)
            s = timing_scores([alignment_words(a, None, timing=timing) for a in aligns], refs)
            report["rows"].append({"snr_db": snr, "variant": name, "silent_spans_per_utterance": spans, **s})
            print(f"SNR {snr:>4} dB  {name:38s} {s['mae_ms']:6.1f} ms  {s['within_50ms']:.2f}  "
                  f"{s['boundaries']:4d} boundaries  {spans:.1f} silent spans/utt", flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timestamps_noise.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
