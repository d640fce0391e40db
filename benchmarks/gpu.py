"""Accelerator benchmark: mask throughput against batch size, reduced precision, automatic batch size.

    python -m benchmarks.gpu --model openai/whisper-tiny.en --manifest data/manifest.tsv --out results/

Sections (``--only`` picks some):

- ``throughput``: masks per second of ``encoder_spes`` and ``spes`` at several batch sizes and with
  ``batch_size="auto"`` (chosen from free GPU memory), in float32 and under bf16 autocast, beside
  plain teacher-forced forwards of the same batch size (the limit).
- ``precision``: the same maps in float32 and under bf16 autocast (same masks): per-token Pearson
  between the two maps, the largest difference relative to the map's maximum, and how far
  ρ(CA, SM) and its corrected value move, next to how far they move between two mask seeds in
  float32 (the noise the masks themselves bring).
- ``monitor``: a short real fine-tune (``examples/finetune_whisper.py``) with and without the
  default monitor, on the accelerator (``benchmarks.perf.bench_monitor``).

Runs on CPU too (then ``"auto"`` takes the CPU defaults). Writes ``gpu.json`` into ``--out``.
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
from xattn_lightning.functional import per_token_correlation

SECTIONS = ("throughput", "precision", "monitor")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _setup(model_path: str, manifest: str, n_utts: int, device: str):
    from xattn_lightning.audio import read_manifest
    from xattn_lightning.loading import features_batch, load_hf_model

    model, proc = load_hf_model(model_path, device=device)
    rows = read_manifest(manifest)[:n_utts]
    batches = [features_batch(proc, [r]) for r in rows]
    targets = []
    for b in batches:
        (e,) = xl.explain(model, b, targets="generate", tokenizer=proc)
        targets.append(e.decoder_ids.unsqueeze(0))
    return model, proc, batches, targets, [r.id for r in rows]


def _explain(model, batch, targets, method: str, **opts):
    _sync()
    (e,) = xl.explain(model, batch, targets=targets, methods=(method,), **opts)
    _sync()
    return e


def _plain_per_s(model, batch, targets, batch_size: int, reps: int) -> float:
    """Teacher-forced forwards per second at ``batch_size`` (no masking, no scoring)."""
    adapter = xl.adapter_for(model)
    (u,) = adapter.utterances(batch)
    x = u.features.to(adapter.device, adapter.dtype).unsqueeze(0).expand(batch_size, -1, -1)
    ids = torch.as_tensor(targets)[0, :-1].to(adapter.device)
    with torch.no_grad():
        adapter.forward(x, ids, output_attentions=False)
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            adapter.forward(x, ids, output_attentions=False)
        _sync()
    return reps * batch_size / (time.perf_counter() - t)


def bench_throughput(model, batch, targets, sizes: dict[str, list], n_masks: dict[str, int]) -> dict:
    out: dict = {}
    for method, bss in sizes.items():
        rows = []
        key = "encoder_batch_size" if method == "encoder_spes" else "batch_size"
        for autocast in (None, "bf16"):
            for bs in bss:
                _explain(model, batch, targets, method, n_masks=min(8, n_masks[method]), **{key: bs}, autocast=autocast)
                e = _explain(model, batch, targets, method, n_masks=n_masks[method], **{key: bs}, autocast=autocast)
                info = e.results[method]
                row = {
                    "autocast": autocast or "fp32",
                    "batch_size": bs,
                    "chosen_batch_size": info.details["batch_size"],
                    "masks_per_s": (info.n_masks or 0) / info.seconds,
                }
                if method == "spes" and autocast is None:
                    row["plain_forwards_per_s"] = _plain_per_s(model, batch, targets, info["batch_size"], 3)
                rows.append(row)
                print(f"  {method} {row}", flush=True)
        out[method] = rows
    return out


def _compare(a, b, method: str) -> dict:
    sa, sb = a.pooled(method), b.pooled(method)
    per_tok = per_token_correlation(sa.float(), sb.float(), "pearson", False)
    per_tok = per_tok[~per_tok.isnan()].tolist() or [float("nan")]
    rel = float((a.saliency[method] - b.saliency[method]).abs().max() / a.saliency[method].abs().max())
    return {
        "per_token_pearson_mean": statistics.fmean(per_tok),
        "per_token_pearson_min": min(per_tok),
        "max_diff_over_max": rel,
        "rho_diff": abs(a.agreement(method) - b.agreement(method)),
        "corrected_diff": abs(a.agreement(method, corrected=True) - b.agreement(method, corrected=True)),
    }


def bench_precision(model, batches, targets, ids, n_masks: dict[str, int]) -> dict:
    out: dict = {}
    for method, n in n_masks.items():
        rows = []
        for uid, batch, tg in zip(ids, batches, targets):
            opts = {"n_masks": n, "batch_size": "auto", "encoder_batch_size": "auto"}
            f32 = _explain(model, batch, tg, method, seed=0, **opts)
            bf16 = _explain(model, batch, tg, method, seed=0, autocast="bf16", **opts)
            other = _explain(model, batch, tg, method, seed=1, **opts)
            row = {"utterance": uid, "rho_fp32": f32.agreement(method), "rho_bf16": bf16.agreement(method)}
            row.update({f"bf16_{k}": v for k, v in _compare(f32, bf16, method).items()})
            row.update({f"seed_{k}": v for k, v in _compare(f32, other, method).items()})
            rows.append(row)
            print(f"  {method} {row}", flush=True)
        keys = [k for k in rows[0] if k.startswith(("bf16_", "seed_"))]
        out[method] = {
            "n_masks": n,
            "rows": rows,
            "mean": {k: statistics.fmean(r[k] for r in rows) for k in keys},
            "worst": {k: (min if "pearson" in k else max)(r[k] for r in rows) for k in keys},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"), required=False)
    ap.add_argument("--manifest", default=os.environ.get("XL_ESPEAK_MANIFEST"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--utterances", type=int, default=4)
    ap.add_argument("--encoder-sizes", default="1,8,32,128,512,auto")
    ap.add_argument("--spes-sizes", default="1,8,32,64,auto")
    ap.add_argument("--encoder-masks", type=int, default=1024)
    ap.add_argument("--spes-masks", type=int, default=256)
    ap.add_argument("--monitor-steps", type=int, default=8)
    ap.add_argument("--monitor-masks", type=int, default=256, help="n_masks of the monitor section")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not args.model or not args.manifest:
        ap.error("needs --model and --manifest (or XL_WHISPER_PATH / XL_ESPEAK_MANIFEST)")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    model, _, batches, targets, ids = _setup(args.model, args.manifest, args.utterances, args.device)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report: dict = {"device": dev, "torch": torch.__version__, "argv": argv or sys.argv[1:]}
    print(f"# {Path(args.model).name} on {dev}, torch {torch.__version__}", flush=True)

    def sizes(s: str) -> list:
        return [x if x == "auto" else int(x) for x in s.split(",")]

    n_masks = {"encoder_spes": args.encoder_masks, "spes": args.spes_masks}
    if "throughput" in only:
        report["throughput"] = bench_throughput(
            model,
            batches[0],
            targets[0],
            {"encoder_spes": sizes(args.encoder_sizes), "spes": sizes(args.spes_sizes)},
            n_masks,
        )
    if "precision" in only:
        report["precision"] = bench_precision(model, batches, targets, ids, n_masks)
        for m, v in report["precision"].items():
            print(f"{m} N={v['n_masks']} mean {v['mean']}\n  worst {v['worst']}", flush=True)
    if "monitor" in only:
        from benchmarks.perf import bench_monitor

        del model
        report["monitor"] = bench_monitor(args.model, args.manifest, args.monitor_steps, args.monitor_masks)
        print(f"monitor {report['monitor']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
