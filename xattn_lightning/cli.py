"""``xattn-lightning`` command line.

``demo``: train a tiny S2T model on a synthetic task with the monitor on.
``compare``: the same probe utterances through several checkpoints, side by side.
``timestamps``: word timings of a manifest's audio (TSV, JSON, WebVTT/SRT with word cues).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from xattn_lightning.errors import XAttnError
from xattn_lightning.saliency.options import READING_N_MASKS, PerturbationOptions
from xattn_lightning.timestamps import HEAD_RULES, TIMESTAMP_N_MASKS, HeadRule


def _png(fig) -> str:
    from xattn_lightning.viz import figure_to_png

    return base64.b64encode(figure_to_png(fig)).decode()


def write_report(monitor, out: Path, title: str = "xattn_lightning demo") -> Path:
    """A self-contained HTML page: agreement curves over training and probe heatmaps."""
    from xattn_lightning.viz import heatmap_figure, history_figure

    hist = monitor.history
    keys = sorted({k for h in hist for k in h if k.endswith("/pearson") or k == "xattn/context_mixing_gap"})
    fig = history_figure(hist, keys)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Agreement over training</h2>",
        f'<img src="data:image/png;base64,{_png(fig)}">',
    ]
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{v}</td>"
            for v in (
                h["epoch"] + 1,
                h.get("log_step", h["step"]),  # the step its scalars were logged at
                *(
                    h.get(k, float("nan"))
                    for k in ("xattn/spes/pearson", "xattn/encoder_spes/pearson", "xattn/context_mixing_gap")
                ),
            )
        )
        + "</tr>"
        for h in hist
    )
    parts.append(
        "<table border=1 cellpadding=4><tr><th>epoch</th><th>step</th><th>ρ(CA,SM_X)</th><th>ρ(CA,SM_H)</th><th>gap</th></tr>"
        + rows
        + "</table>"
    )
    for label, exps in (("first run (untrained)", monitor.first_explanations), ("last run", monitor.last_explanations)):
        parts.append(f"<h2>Probe heatmaps, {label}</h2>")
        for i, e in enumerate(exps[:3]):
            parts.append(
                f'<img src="data:image/png;base64,{_png(heatmap_figure(e, monitor.config.methods, title=f"probe {i}"))}">'
            )
    ranking = monitor.head_ranking.get(monitor.config.methods[0], [])[:5]
    parts.append(
        "<h2>Heads that agree best with saliency</h2><ol>"
        + "".join(f"<li>layer {li}, head {hi}: ρ={r:.3f}</li>" for li, hi, r in ranking)
        + "</ol>"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(
        "<html><meta charset='utf-8'><body style='font-family:sans-serif'>" + "\n".join(parts) + "</body></html>",
        encoding="utf-8",
    )
    return path


def demo(args: argparse.Namespace) -> int:
    """Train the tiny S2T model on the synthetic task with the monitor and W&B offline."""
    start = time.perf_counter()
    monitor, report, hints = run_demo(args)
    for hint in hints:
        print(f"W&B run saved offline; upload it with: {hint}")
    first, last = monitor.history[0], monitor.history[-1]
    print(
        f"ρ(CA, SM_X): {first['xattn/spes/pearson']:+.3f} after epoch 1 -> {last['xattn/spes/pearson']:+.3f} after epoch {args.epochs}"
    )
    print(f"ρ(CA, SM_H): {first['xattn/encoder_spes/pearson']:+.3f} -> {last['xattn/encoder_spes/pearson']:+.3f}")
    print(f"report: {report}   ({time.perf_counter() - start:.0f} s)")
    return 0


def run_demo(args: argparse.Namespace):
    """The demo's training run; returns ``(monitor, report path, W&B sync hints)``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from xattn_lightning.callbacks import XAttnSaliencyMonitor
    from xattn_lightning.demo import DemoModule, loaders
    from xattn_lightning.loggers import offline_sync_hint, wandb_logger

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, verbose=False)
    train, val = loaders(args.train_size, 16)
    monitor = XAttnSaliencyMonitor(
        num_probes=4,
        methods=("spes", "encoder_spes"),
        targets="labels",
        n_masks=args.n_masks,
        seed=args.seed,
        max_overhead=None,  # the demo shows the signal; its epochs are too short for a 10 % budget
    )
    loggers = [CSVLogger(out)]
    if not args.no_wandb:
        loggers.append(wandb_logger(project="xattn-lightning-demo", save_dir=out))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],
        logger=loggers,
        accelerator="cpu",
        devices=1,
        default_root_dir=out,
        enable_checkpointing=False,
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    trainer.fit(DemoModule(), train, val)
    report = write_report(monitor, out)
    hints: list[str] = []
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            hint = offline_sync_hint(lg)
            if hint:
                hints.append(hint)
            lg.experiment.finish()
    return monitor, report, hints


def compare(args: argparse.Namespace) -> int:
    """Explain the same probes with every checkpoint; table on stdout, CSV/JSON/figures in --out."""
    from xattn_lightning.audio import load_audio, read_manifest
    from xattn_lightning.compare import compare_checkpoints
    from xattn_lightning.compare_report import log_comparison_to_wandb, write_comparison

    rows = read_manifest(args.manifest)[: args.num_probes]
    for r in rows:  # fail on unreadable audio before loading any model
        load_audio(r.audio)
    for c in args.checkpoints:
        if c.endswith(".ckpt") and not Path(c).is_file():
            raise XAttnError(f"Checkpoint {c!r} does not exist.")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    trainer_kwargs = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes}
    if args.strategy:
        trainer_kwargs["strategy"] = args.strategy
    start = time.perf_counter()
    comp = compare_checkpoints(
        args.checkpoints,
        rows,
        methods=methods,
        targets=args.targets,
        module=args.module,
        base_model=args.base_model,
        names=names,
        batch_size=args.batch_size,
        trainer_kwargs=trainer_kwargs,
        n_masks=args.n_masks,
        seed=args.seed,
    )
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    try:
        if distributed and dist.get_rank() != 0:
            return 0  # every rank explained its share and took part in the gather; rank 0 writes and prints
        files = write_comparison(comp, args.out)
        print(comp.table())
        print(
            f"{len(rows)} probes, {time.perf_counter() - start:.0f} s; written: "
            + ", ".join(str(p) for p in files.values())
        )
        if args.wandb:
            run_dir = log_comparison_to_wandb(comp, files, args.out)
            print(f"W&B run: {run_dir}")
        return 0
    finally:
        if distributed:
            _close_process_group()


def timestamps(args: argparse.Namespace) -> int:
    """Word timings of every utterance of a manifest, written as TSV/JSON (a file or stdout) or as one
    WebVTT/SRT file per utterance; with a ``words`` column, their error against it on stderr. Audio longer than the
    model's window (Whisper: 30 s) is cut into pieces at quiet points, each timed, the times shifted back
    (:func:`~xattn_lightning.timestamps.audio.audio_word_timestamps`)."""
    from xattn_lightning.audio import read_manifest
    from xattn_lightning.loading import features_batch, load_hf_model
    from xattn_lightning.timestamps import (
        CHOICE_UTTERANCES,
        SILENT_PEAK,
        audio_word_timestamps,
        cached_heads,
        captions,
        choose_heads,
        forget_heads,
        heads_report,
        timing_scores,
    )

    rows = read_manifest(args.manifest, text_required=False)
    if not rows:
        raise XAttnError(f"The manifest {args.manifest!r} has no utterances.")
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise XAttnError(f"The manifest {args.manifest!r} has the id {r.id!r} twice; each utterance needs its own.")
        seen.add(r.id)
    if args.format in ("vtt", "srt") and args.out in (None, "-"):
        raise XAttnError(f"--format {args.format} writes one file per utterance: pass --out DIRECTORY.")
    if args.format in ("vtt", "srt") and Path(args.out).suffix.lower() in (".vtt", ".srt"):
        raise XAttnError(
            f"--format {args.format} writes one file per utterance into a directory, and {args.out!r} looks like a "
            f"file: pass --out DIRECTORY (each utterance's file is named after its id)."
        )
    if args.format in ("tsv", "json") and args.out not in (None, "-") and (
        args.out.endswith(("/", os.sep)) or Path(args.out).is_dir()
    ):
        raise XAttnError(f"--format {args.format} writes one file: {args.out!r} is a directory; pass a file name.")
    if args.text and any(not r.text for r in rows):
        missing = next(r.id for r in rows if not r.text)
        raise XAttnError(f"--text times the manifest's text, and utterance {missing!r} has none: add a text column.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        _quiet_transformers()
    model, processor = load_hf_model(args.model, device=args.device)
    heads: HeadRule = args.heads
    options: dict[str, Any] = {"n_masks": args.n_masks, "seed": args.seed} if heads == "agreement" else {}
    if args.plain:
        options.update(duration_prior=0.0, silence=False)
    auto = heads == "auto"
    if (args.choose_again or args.choose_on) and not auto:
        raise XAttnError("--choose-again and --choose-on choose the default's head set: leave --heads at auto.")
    if auto and args.choose_again:
        forget_heads(model)
    if auto and args.choose_on:  # chosen beforehand on other (unlabelled) speech of the same kind, and kept
        choosing = read_manifest(args.choose_on, text_required=False)[:CHOICE_UTTERANCES]
        if not choosing:
            raise XAttnError(f"The manifest {args.choose_on!r} has no utterances to choose the head set on.")
        choose_heads(model, [features_batch(processor, choosing)], tokenizer=processor)
    kept = cached_heads(model) if auto and not args.choose_on else None  # a final choice read back from disk
    start = time.perf_counter()
    timed = audio_word_timestamps(
        model,
        [r.audio for r in rows],
        processor=processor,
        texts=[r.text for r in rows] if args.text else None,
        names=[repr(r.id) for r in rows],
        heads=heads,
        progress=not args.quiet,
        **options,
    )
    words = {r.id: t.words for r, t in zip(rows, timed)}
    silent = [
        f"{r.id} {a:.1f}-{b:.1f} s" if len(t.pieces) > 1 else r.id for r, t in zip(rows, timed) for a, b in t.silent
    ]
    seconds = time.perf_counter() - start
    if silent:
        print(
            f"no words for {len(silent)} silent stretch(es) (peak below {20 * math.log10(SILENT_PEAK):.0f} dBFS): "
            + ", ".join(silent[:5])
            + (" ..." if len(silent) > 5 else ""),
            file=sys.stderr,
        )
    report = heads_report(model, read_back=kept is not None, source=args.choose_on) if auto else None
    if report is not None:
        print(report + (" (--choose-again to choose anew)" if kept is not None else ""), file=sys.stderr)
    if args.format in ("vtt", "srt"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write = captions.to_webvtt if args.format == "vtt" else captions.to_srt
        for uid, ws in words.items():
            (out / f"{uid}.{args.format}").write_text(write(ws), encoding="utf-8")
        where = f"{len(words)} .{args.format} files in {out}"
    else:
        text = captions.to_tsv(words) if args.format == "tsv" else captions.to_json(words)
        if args.out in (None, "-"):
            sys.stdout.write(text)
            where = "stdout"
        else:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
            where = args.out
    print(f"{len(rows)} utterances, {seconds / len(rows):.2f} s each; written to {where}", file=sys.stderr)
    scored = [r for r in rows if r.words]
    if scored:
        s = timing_scores([words[r.id] for r in scored], [r.words or [] for r in scored])
        print(
            f"against the manifest's word timings ({len(scored)} utterances, {s['boundaries']:.0f} boundaries: the "
            f"{s['boundaries'] / 2:.0f} of {sum(len(r.words or []) for r in scored)} true words the transcript got "
            f"right): mean error {s['mae_ms']:.1f} ms, {100 * s['within_50ms']:.0f} % within 50 ms",
            file=sys.stderr,
        )
    return 0


def _quiet_transformers() -> None:
    """No progress bars or info lines from transformers (``--quiet``)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency of the loaders
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _close_process_group() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    A Gloo/NCCL process group left alive at exit is destroyed during interpreter shutdown, where its
    worker threads can still be joinable: the C++ runtime then aborts the process ("terminate called
    without an active exception", exit -6) although the work was done. Rank 0 may still be writing
    when the other ranks finish, so all ranks meet at a barrier first.
    """
    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``xattn-lightning``; errors are one line on stderr and a non-zero exit."""
    parser = argparse.ArgumentParser(prog="xattn-lightning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a tiny S2T model on a synthetic task with the monitor on")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--train-size", type=int, default=512)
    d.add_argument("--n-masks", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="xattn_runs/demo")
    d.add_argument("--no-wandb", action="store_true")
    c = sub.add_parser("compare", help="the same probe utterances through several checkpoints, side by side")
    c.add_argument(
        "checkpoints",
        nargs="+",
        metavar="MODEL_OR_CKPT",
        help="HF directories/ids, PEFT adapter directories or Lightning .ckpt files",
    )
    c.add_argument("--manifest", required=True, help="TSV: id<TAB>audio<TAB>text (audio relative to the manifest)")
    c.add_argument("--num-probes", type=int, default=8, help="first N utterances of the manifest")
    c.add_argument("--methods", default="encoder_spes", help="comma-separated saliency methods")
    c.add_argument(
        "--n-masks",
        type=lambda v: v if v == "auto" else int(v),
        default=READING_N_MASKS,
        help="masks per saliency map, or 'auto' (default): chosen once for all checkpoints so that every one gets "
        "a corrected headline",
    )
    c.add_argument("--seed", type=int, default=PerturbationOptions.seed)
    c.add_argument("--targets", default="generate", choices=("generate", "labels"))
    c.add_argument("--module", help="package.module:Class of the LightningModule, for .ckpt files")
    c.add_argument("--base-model", help="base model of PEFT adapter directories (default: the one each names)")
    c.add_argument("--names", help="comma-separated display names, one per checkpoint")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--out", default="xattn_runs/compare")
    c.add_argument("--wandb", action="store_true", help="log the comparison as one W&B run (offline without a key)")
    c.add_argument("--accelerator", default="cpu")
    c.add_argument("--devices", default=1, type=lambda v: v if v == "auto" else int(v))
    c.add_argument("--num-nodes", type=int, default=1)
    c.add_argument("--strategy", default=None)
    t = sub.add_parser("timestamps", help="word timings of a manifest's audio (TSV, JSON, WebVTT/SRT word cues)")
    t.add_argument("model", help="an HF Whisper id or directory (e.g. openai/whisper-tiny.en)")
    t.add_argument(
        "--manifest",
        required=True,
        help="TSV: id<TAB>audio[<TAB>text[<TAB>words]], audio paths relative to the manifest's folder; audio longer "
        "than the model's window (Whisper: 30 s) is cut at quiet points and timed piece by piece. The text is only "
        "read with --text; words (true timings, JSON) are scored against",
    )
    t.add_argument(
        "--text",
        action="store_true",
        help="forced alignment: time the manifest's text instead of the model's own transcript (audio within the "
        "model's window)",
    )
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's own choice)")
    t.add_argument("--format", default="tsv", choices=("tsv", "json", "vtt", "srt"))
    t.add_argument("--out", help="a file for tsv/json (default: stdout), a directory for vtt/srt")
    t.add_argument(
        "--heads",
        default="auto",
        choices=HEAD_RULES,
        help="auto (default): the model's head set, chosen once without labels on the first utterances "
        "(docs/timestamps.md); all: every head; upper_half: every head of the upper half of the layers; consistent: "
        "the heads nearest the consensus; all+consistent: the boundaries of every head and of those averaged; agreement: the heads that agree most with saliency, per utterance, the map "
        "fused in (a saliency computation per utterance); model: the model's own alignment heads",
    )
    t.add_argument(
        "--choose-again",
        action="store_true",
        help="with --heads auto: forget the head set chosen for this model earlier (kept on disk, "
        "$XATTN_LIGHTNING_CACHE) and choose it on this manifest",
    )
    t.add_argument(
        "--choose-on",
        metavar="MANIFEST",
        help="with --heads auto: choose the head set on the first 8 utterances of this manifest (unlabelled speech of "
        "the same kind) before timing, and keep it for later runs: for manifests of fewer than 8 utterances",
    )
    t.add_argument(
        "--plain",
        action="store_true",
        help="plain DTW as openai-whisper's (no duration prior, no boundaries moved to silences)",
    )
    t.add_argument(
        "--n-masks", type=int, default=TIMESTAMP_N_MASKS, help="masks of the saliency behind --heads agreement (default: %(default)s)"
    )
    t.add_argument("--seed", type=int, default=PerturbationOptions.seed)
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    commands = {"demo": demo, "compare": compare, "timestamps": timestamps}
    try:
        return commands[args.command](args)
    except XAttnError as err:
        print(f"xattn-lightning: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xattn-lightning: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, never a traceback (XATTN_DEBUG=1 shows it)
        if os.environ.get("XATTN_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"xattn-lightning: error: {type(err).__name__}: {msg} (set XATTN_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
