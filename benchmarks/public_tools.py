"""Word timestamps of the public Whisper tools, as users run them, against ``xl.word_timestamps``.

    python -m benchmarks.public_tools --model openai/whisper-tiny.en --timed data/timed-en/manifest.tsv --out results/

Every tool gets the same Hugging Face Whisper (openai-whisper's model is built from its weights, nothing is
downloaded) and the same held-out timed utterances (from ``--first-scored`` on): openai-whisper's
``transcribe(word_timestamps=True)`` with the shipped alignment heads and with its fallback when a model has
none (every head of the upper half of the layers), whisper-timestamped's ``transcribe`` and stable-ts'
``transcribe`` with their defaults, transformers' ASR pipeline with ``return_timestamps="word"``, and
``xl.word_timestamps`` (its default in a first run, its head choice included, and in a later run, the choice read
back from the disk cache; and ``heads="agreement"``), and a plain greedy decode as the cost reference (its error
columns are empty). Each row: mean boundary error of the word units
the transcript got right, the shares within 50 and 100 ms, seconds per utterance. A tool that is not installed
is reported as such. Needs ``pip install openai-whisper whisper-timestamped stable-ts``. Writes
``public_tools.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import xattn_lightning as xl
from xattn_lightning.audio import load_audio, read_manifest
from xattn_lightning.functional.alignment import Word
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.timestamps import timing_scores


def _words_of_segments(segments) -> list[Word]:
    """openai-whisper / whisper-timestamped result segments to ``(word, start, end)``."""
    out = []
    for seg in segments:
        for w in seg.get("words", []):
            out.append((str(w.get("word", w.get("text", ""))).strip(), float(w["start"]), float(w["end"])))
    return out


def tools(hf_model, proc) -> dict[str, Callable[[np.ndarray, object], list[Word]]]:
    """The tools to run: name -> f(audio 16 kHz float32, manifest row) -> words."""
    from xattn_lightning.adapters.openai_whisper import openai_whisper_from_hf, set_alignment_heads

    out: dict[str, Callable] = {}
    try:
        import whisper  # noqa: F401

        shipped = openai_whisper_from_hf(hf_model)
        fallback = openai_whisper_from_hf(hf_model)
        n_layers, n_heads = fallback.dims.n_text_layer, fallback.dims.n_text_head
        set_alignment_heads(fallback, [[li, h] for li in range(n_layers // 2, n_layers) for h in range(n_heads)])
        english = not hf_model.generation_config.is_multilingual if hasattr(hf_model.generation_config, "is_multilingual") else True
        lang = {"language": "en"} if english else {}
        out["openai-whisper word_timestamps=True (shipped heads)"] = lambda a, r: _words_of_segments(
            shipped.transcribe(a, word_timestamps=True, fp16=False, **lang)["segments"]
        )
        out["openai-whisper, heads left at its fallback (upper half of the layers)"] = lambda a, r: _words_of_segments(
            fallback.transcribe(a, word_timestamps=True, fp16=False, **lang)["segments"]
        )
    except ImportError as err:
        print(f"openai-whisper not installed: {err}", file=sys.stderr)
        return out
    try:
        import whisper_timestamped

        wt_model = openai_whisper_from_hf(hf_model)
        out["whisper-timestamped (defaults)"] = lambda a, r: _words_of_segments(
            whisper_timestamped.transcribe(wt_model, a, verbose=None, **lang)["segments"]
        )
    except ImportError as err:
        print(f"whisper-timestamped not installed: {err}", file=sys.stderr)
    try:
        import stable_whisper

        st_model = openai_whisper_from_hf(hf_model)
        stable_whisper.modify_model(st_model)

        def stable(a, r):
            res = st_model.transcribe(a, verbose=None, fp16=False, **lang)
            return [(w.word.strip(), float(w.start), float(w.end)) for w in res.all_words()]

        out["stable-ts (defaults)"] = stable
    except ImportError as err:
        print(f"stable-ts not installed: {err}", file=sys.stderr)
    from transformers import pipeline

    pipe = pipeline("automatic-speech-recognition", model=copy.deepcopy(hf_model), tokenizer=proc.tokenizer,
                    feature_extractor=proc.feature_extractor, device="cpu")  # fmt: skip

    def hf_pipeline(a, r):
        res = pipe(a.copy(), return_timestamps="word")
        return [(c["text"].strip(), float(c["timestamp"][0]), float(c["timestamp"][1] or c["timestamp"][0]))
                for c in res["chunks"]]  # fmt: skip

    out['transformers pipeline return_timestamps="word" (shipped heads)'] = hf_pipeline
    out["transformers generate (greedy decode, no timestamps: the cost reference)"] = lambda a, r: (
        hf_model.generate(features_batch(proc, [r])["input_features"]),
        [],
    )[1]
    out["xl.word_timestamps (default; a first run: its head choice on the first 8 included)"] = (
        lambda a, r: xl.word_timestamps(hf_model, features_batch(proc, [r]), tokenizer=proc)[0]
    )
    later = copy.deepcopy(hf_model)  # the same weights, as a later run loads them: the choice is read back from disk
    out["xl.word_timestamps (default; a later run: its head choice read back from disk)"] = (
        lambda a, r: xl.word_timestamps(later, features_batch(proc, [r]), tokenizer=proc)[0]
    )
    fresh = copy.deepcopy(hf_model)  # the same weights, nothing chosen in memory; its own empty disk cache below

    def one_call(audio: list, rows: list) -> list:
        os.environ["XATTN_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="xl-heads-")
        return [t.words for t in xl.audio_word_timestamps(fresh, audio, processor=proc)]

    out[JOB + "xl.audio_word_timestamps (default; a first run, the utterances in one call: one choice, on the first 8)"] = one_call
    out['xl.word_timestamps(heads="agreement")'] = lambda a, r: xl.word_timestamps(
        hf_model, features_batch(proc, [r]), tokenizer=proc, heads="agreement"
    )[0]
    return out


#: the name prefix of a tool run once on every utterance (a job), not once per utterance
JOB = "job: "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--timed", default=os.environ.get("XL_TIMED_MANIFEST"), help="manifest with a words column")
    ap.add_argument("--first-scored", type=int, default=12, help="score the utterances from this one on")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the tools whose name has one")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    os.environ["XATTN_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="xl-heads-")  # an empty disk cache, not the user's
    if not (args.model and args.timed):
        ap.error("needs --model and --timed (or XL_WHISPER_PATH / XL_TIMED_MANIFEST)")
    torch.manual_seed(0)
    model, proc = load_hf_model(args.model)
    model.eval()
    rows = read_manifest(args.timed)[args.first_scored :]
    if not rows or any(r.words is None for r in rows):
        ap.error(f"{args.timed} has no utterances with a words column from row {args.first_scored} on")
    audio = [load_audio(r.audio).numpy().astype(np.float32) for r in rows]
    refs = [r.words for r in rows]
    report: dict = {"model": args.label or Path(args.model).name, "timed": args.timed, "utterances": len(rows),
                    "rows": [], "argv": argv or sys.argv[1:]}  # fmt: skip
    wanted = [w for w in args.only.split(",") if w]
    print(f"# {report['model']}: {len(rows)} held-out timed utterances")
    for name, run in tools(model, proc).items():
        if wanted and not any(w in name for w in wanted):
            continue
        t0 = time.perf_counter()
        pred = run(audio, rows) if name.startswith(JOB) else [run(a, r) for a, r in zip(audio, rows)]
        name = name.removeprefix(JOB)
        sec = (time.perf_counter() - t0) / len(rows)
        if not any(pred):  # the greedy decode: a cost reference, nothing to score
            report["rows"].append({"tool": name, "seconds_per_utterance": sec})
            print(f"{name:70s} {'':40s}  {sec:.2f} s/utt", flush=True)
            continue
        s = timing_scores(pred, refs)
        report["rows"].append({"tool": name, "seconds_per_utterance": sec, **s})
        print(f"{name:70s} {s['mae_ms']:7.1f} ms {s['within_50ms']:5.2f} {s['within_100ms']:5.2f} "
              f"{s['boundaries']:4d}  {sec:.2f} s/utt", flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"public_tools{('_' + args.label) if args.label else ''}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
