"""The monitor's overhead in each training host, on a short run: the same fine-tune with and without it,
interleaved pairs, in one process (these machines are noisy: compare within one run only).

    python -m benchmarks.hosts --host hf --model $XL_WHISPER_PATH --manifest train.tsv --eval-manifest dev.tsv
    python -m benchmarks.hosts --host nemo --manifest train.tsv --eval-manifest dev.tsv   # in an env with NeMo

``hf``: ``examples/finetune_whisper_hf_trainer.py`` (Seq2SeqTrainer, real Whisper); ``nemo``:
``examples/finetune_nemo_aed.py --tiny`` (NeMo's trainer.fit, a tiny random Canary-style model, the monitor explaining
the references). Prints and writes ``hosts_<host>.json``: each run's seconds, the readings' seconds, and the ratio
of the fastest run with the monitor to the fastest without.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def run(host: str, model: str | None, manifest: str, eval_manifest: str, steps: int, pairs: int, n_masks: str) -> dict:
    if host == "hf":
        ex = _example("finetune_whisper_hf_trainer")
        common = ["--model", str(model), "--manifest", manifest, "--eval-manifest", eval_manifest, "--max-steps",
                  str(steps), "--eval-steps", str(max(1, steps // 2)), "--batch-size", "2", "--num-probes", "2",
                  "--n-masks", n_masks, "--report-to", "none"]  # fmt: skip
        readings = lambda out: [h["xattn/seconds"] for h in out["log_history"] if "xattn/seconds" in h]  # noqa: E731
    else:
        ex = _example("finetune_nemo_aed")
        common = ["--tiny", "--manifest", manifest, "--val-manifest", eval_manifest, "--max-steps", str(steps),
                  "--val-every", str(max(1, steps // 2)), "--n-masks", n_masks, "--targets", "labels", "--no-wandb"]  # fmt: skip
        readings = lambda out: [h["xattn/seconds"] for h in out["history"]]  # noqa: E731
    res: dict = {"host": host, "steps": steps, "n_masks": n_masks, "runs": []}
    for k in range(pairs):
        for monitor in (False, True):
            args = [*common, "--out", f"/tmp/xl_bench_hosts_{host}_{k}_{int(monitor)}", "--max-overhead", "none"]
            t = time.perf_counter()
            out = ex.main(args if monitor else [*args, "--no-monitor"])
            res["runs"].append({"monitor": monitor, "seconds": time.perf_counter() - t,
                                "readings_s": readings(out) if monitor else []})  # fmt: skip
    with_ = [r["seconds"] for r in res["runs"] if r["monitor"]]
    without = [r["seconds"] for r in res["runs"] if not r["monitor"]]
    res["overhead_fastest"] = min(with_) / min(without) - 1.0
    res["overhead_median"] = statistics.median(w / wo - 1.0 for w, wo in zip(with_, without))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", choices=("hf", "nemo"), required=True)
    ap.add_argument("--model", help="HF Whisper for --host hf")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--eval-manifest", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--n-masks", default="256")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    res = run(a.host, a.model, a.manifest, a.eval_manifest, a.steps, a.pairs, a.n_masks)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"hosts_{a.host}.json").write_text(json.dumps(res, indent=1))
    for r in res["runs"]:
        print(
            f"{'with' if r['monitor'] else 'without':>7} the monitor: {r['seconds']:.1f} s  readings {r['readings_s']}"
        )
    print(
        f"overhead: {100 * res['overhead_fastest']:+.1f} % fastest to fastest, {100 * res['overhead_median']:+.1f} % median"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
