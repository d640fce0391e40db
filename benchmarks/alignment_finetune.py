"""A fine-tune with and without the alignment loss (``xl.AlignmentLoss``): word-timestamp error on held-out timed
speech and WER on held-out human speech, before and after.

    python -m benchmarks.alignment_finetune --model openai/whisper-tiny.en \\
        --train timed_a/manifest.tsv,timed_b/manifest.tsv --timed data/timed-en/manifest.tsv \\
        --human data/human-en/manifest.tsv --epochs 3 --weight 1.0 --out results/

``--train`` manifests have a ``words`` column (e.g. made with ``shared/tools/timed_speech.py`` from
``benchmarks/data/alignment_sentences.txt``, in voices other than the evaluation speech's); their last
``--holdout`` rows are the monitor's timed probes and the validation set, never trained on. Both runs
use ``examples/finetune_whisper.py`` with the same seed, data order and settings; one adds
``--alignment-loss WEIGHT`` (heads chosen by their own error on 8 training utterances, exported at the
end). Each checkpoint is scored on the ``--timed`` utterances from ``--first-scored`` on (no run or choice
saw them): the exported or shipped heads with plain DTW (what ``return_token_timestamps`` and openai-whisper
use) and with the duration prior and silences, ``xl.word_timestamps``' default, and the heads chosen per
utterance by agreement (``heads="agreement"``); and by WER on ``--human``. Writes
``alignment_finetune.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.text import wer
from xattn_lightning.timestamps import timing_scores

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune_whisper.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_whisper_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _merged(manifests: list[str], holdout: int, out: Path) -> tuple[Path, Path]:
    """One training and one held-out manifest (absolute audio paths); the last ``holdout`` rows of each
    input manifest are held out."""
    header, train, held = None, [], []
    for m in manifests:
        lines = Path(m).read_text().splitlines()
        header = lines[0]
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        for r in rows:
            r[1] = str((Path(m).parent / r[1]).resolve())
        k = holdout // len(manifests)
        train += rows[: len(rows) - k]
        held += rows[len(rows) - k :]
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.tsv", out / "holdout.tsv"
    for p, rows in zip(paths, (train, held)):
        p.write_text("\n".join([header, *["\t".join(r) for r in rows]]) + "\n")
    return paths


def evaluate(path: str, timed: list, human: list, n_masks: int, label_free: bool) -> dict:
    """Timestamp scores and WER of one checkpoint: the model's heads with plain DTW (what
    ``return_token_timestamps`` and openai-whisper compute) and with the duration prior and silences,
    ``xl.word_timestamps``' default (every head, prior and silences), and with ``label_free`` the heads
    chosen per utterance by agreement with saliency (``n_masks``)."""
    model, proc = load_hf_model(path)
    model.eval()
    out: dict = {"alignment_heads": xl.adapter_for(model, proc).alignment_heads()}
    refs = [r.words for r in timed]
    batches = [features_batch(proc, [r]) for r in timed]
    variants = {
        "model_heads": {"heads": "model", "duration_prior": 0.0, "silence": False},
        "model_heads_prior_silences": {"heads": "model"},
        "default": {},
    }
    if label_free:
        variants["agreement"] = {"heads": "agreement", "n_masks": n_masks}
    for name, options in variants.items():
        t0 = time.perf_counter()
        pred = [xl.word_timestamps(model, b, tokenizer=proc, **options)[0] for b in batches]
        out[name] = {**timing_scores(pred, refs), "s_per_utt": (time.perf_counter() - t0) / len(timed)}
    hyps = []
    with torch.no_grad():
        for r in human:
            ids = model.generate(features_batch(proc, [r])["input_features"], max_new_tokens=200)
            hyps.append(proc.batch_decode(ids, skip_special_tokens=True)[0])
    out["human_wer"] = wer([r.text for r in human], hyps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--train", required=True, help="comma-separated timed manifests to fine-tune on")
    ap.add_argument("--timed", default=os.environ.get("XL_TIMED_MANIFEST"), help="held-out timed speech")
    ap.add_argument("--human", default=os.environ.get("XL_HUMAN_MANIFEST"), help="held-out human speech (WER)")
    ap.add_argument("--first-scored", type=int, default=12, help="score the timed utterances from this one on")
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the alignment loss")
    ap.add_argument("--heads", default="supervised", help="the heads the loss trains (finetune_whisper --alignment-heads)")
    ap.add_argument("--runs", default="without_loss,with_loss", help="which fine-tunes to run")
    ap.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (about 5x faster on CPU)")
    ap.add_argument("--n-masks", type=int, default=64, help="masks of the saliency behind heads='agreement'")
    ap.add_argument("--no-label-free", action="store_true", help="skip heads='agreement' (its saliency is the slow part)")
    ap.add_argument("--work", default="runs/alignment_finetune")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not (args.model and args.timed and args.human):
        ap.error("needs --model, --timed and --human (or XL_WHISPER_PATH / XL_TIMED_MANIFEST / XL_HUMAN_MANIFEST)")
    work = Path(args.work)
    train, held = _merged(args.train.split(","), args.holdout, work)
    timed = read_manifest(args.timed)[args.first_scored :]
    human = read_manifest(args.human)
    ex = _example()
    report: dict = {"settings": {**vars(args), "train_rows": len(read_manifest(train))}, "runs": {}}
    # the base checkpoint's scores, kept between runs: reused only when everything they depend on is the same
    before = Path(args.out) / "alignment_finetune_before.json"
    key = {k: getattr(args, k) for k in ("model", "timed", "human", "first_scored", "n_masks", "no_label_free")}
    key["scores"] = "model_heads, model_heads_prior_silences, default, agreement"  # what evaluate() computes
    if before.is_file() and json.loads(before.read_text()).get("key") == key:
        report["runs"]["before"] = json.loads(before.read_text())["scores"]
    else:
        report["runs"]["before"] = evaluate(args.model, timed, human, args.n_masks, not args.no_label_free)
        before.parent.mkdir(parents=True, exist_ok=True)
        before.write_text(json.dumps({"key": key, "scores": report["runs"]["before"]}))
    print(json.dumps(report["runs"]["before"]), flush=True)
    runs = [r for r in (("without_loss", 0.0), ("with_loss", args.weight)) if r[0] in args.runs.split(",")]
    for label, weight in runs:
        save = work / label / "model"
        argv_ex = ["--model", args.model, "--manifest", str(train), "--val-manifest", str(held),
                   "--timed-manifest", str(held), "--num-probes", "2", "--n-masks", "64", "--max-overhead", "none",
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                   "--no-wandb", "--accelerator", "cpu", "--out", str(work / label), "--save", str(save)]  # fmt: skip
        if weight:
            argv_ex += ["--alignment-loss", str(weight), "--alignment-heads", args.heads]
        if args.freeze_encoder:
            argv_ex.append("--freeze-encoder")
        t0 = time.perf_counter()
        res = ex.main(argv_ex)
        history = [{k: v for k, v in e.items() if "timestamps/" in k or k == "step"} for e in res["history"]]
        run = {"train_seconds": time.perf_counter() - t0, "monitor_timestamps": history}
        run.update(evaluate(str(save), timed, human, args.n_masks, not args.no_label_free))
        report["runs"][label] = run
        print(label, json.dumps(run), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment_finetune.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
