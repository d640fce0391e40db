"""The monitor's cost on a real fine-tune, two versions of the package side by side in one run (issue 34).

Runs ``examples/finetune_whisper.py`` of each source tree in its own process (``PYTHONPATH`` the tree), in
interleaved rounds: without the monitor, then the monitor of every tree given, ``--rounds`` times. Every run
trains the same model on the same data for the same steps; the monitor runs at its defaults
(``n_masks="auto"``, 4 probes from validation, a reading every epoch) with ``max_overhead=None``, so that
every reading is taken. Prints and writes one JSON: each run's wall seconds, readings' seconds and last
headline, and each tree's overhead against the run without the monitor of the same round.

    python -m benchmarks.monitor_overhead --trees /tmp/old_tree,. --manifest /tmp/train40.tsv --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RUN = r"""
import importlib.util, json, sys, time
import lightning.pytorch as pl
spec = importlib.util.spec_from_file_location("ft", sys.argv[1] + "/examples/finetune_whisper.py")
ft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ft)
if sys.argv[2] not in ("on", "off"):  # variant parts joined by "+": bf16 / exact (the vocabulary), n<count>
    import functools
    kw, extra = {}, []
    for part in sys.argv[2].split("+"):
        if part in ("bf16", "exact"):
            kw["saliency_options"] = {"vocabulary": part}
        elif part.startswith("n") and part[1:].isdigit():
            extra += ["--n-masks", part[1:]]
        else:
            raise SystemExit(f"unknown variant {part!r}")
    ft.XAttnSaliencyMonitor = functools.partial(ft.XAttnSaliencyMonitor, **kw)
if sys.argv[2] == "off":
    class Off(pl.Callback):
        history: list = []
        head_ranking: dict = {}
        def __init__(self, *a, **k):
            pass
    ft.XAttnSaliencyMonitor = Off
t = time.perf_counter()
out = ft.main(sys.argv[3:] + (extra if sys.argv[2] not in ("on", "off") else []))
keys = ("xattn/seconds", "xattn/encoder_spes/pearson", "xattn/encoder_spes/pearson_corrected",
        "xattn/encoder_spes/n_masks", "xattn/encoder_spes/reliability")
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t,
                              "history": [{k: h.get(k) for k in keys} for h in out["history"]]}))
"""


def run(tree: str, monitor: bool, args: list[str]) -> dict:
    """One fine-tune in its own process with ``tree``'s package; ``tree@VARIANT``: the monitor with
    ``VARIANT``'s settings, parts joined by ``+``: ``bf16`` or ``exact`` (the vocabulary), ``n768`` (``n_masks``)."""
    tree, _, variant = tree.partition("@")
    tree = str(Path(tree).resolve())
    env = {**os.environ, "PYTHONPATH": tree}
    with tempfile.TemporaryDirectory() as elsewhere:  # not the current directory, which Python puts before PYTHONPATH
        proc = subprocess.run(
            [sys.executable, "-c", _RUN, tree, (variant or "on") if monitor else "off", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=elsewhere,
        )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tree} ({'with' if monitor else 'without'} the monitor) failed:\n{proc.stderr[-3000:]}")
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if "XAttnSaliencyMonitor:" in x]
    return {**json.loads(lines[-1][len("RESULT ") :]), "said": said}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trees", required=True, help="comma-separated source trees (each with its own examples/; tree@bf16+n768: "
        "its monitor with vocabulary='bf16' and n_masks=768); the run without the monitor uses the last"
    )  # fmt: skip
    ap.add_argument("--save", help="the first round's run of tree --save-index saves its fine-tuned model here")
    ap.add_argument("--save-index", type=int, default=0)
    ap.add_argument("--model", default=os.environ.get("XL_WHISPER_PATH"))
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--val-manifest", help="validation utterances, where the 4 probes come from (default: --manifest)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/monitor_overhead_cpu.json")
    args = ap.parse_args(argv)
    trees = [str(Path(t.partition("@")[0]).resolve()) + t[len(t.partition("@")[0]) :] for t in args.trees.split(",")]
    ft_args = [
        "--model", args.model, "--manifest", args.manifest, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--limit-val-batches", "1", "--num-probes", "4",
        "--no-wandb", "--max-overhead", "none", "--out", "/tmp/xl_monitor_overhead",
    ] + (["--val-manifest", args.val_manifest] if args.val_manifest else [])  # fmt: skip
    runs: list[dict] = []
    t0 = time.perf_counter()
    for r in range(args.rounds):
        base = run(trees[-1].partition("@")[0], False, ft_args)
        runs.append({"round": r, "tree": None, **base})
        print(f"round {r}: without the monitor {base['seconds']:.1f} s", flush=True)
        for i, tree in enumerate(trees):
            res = run(
                tree, True, ft_args + (["--save", args.save] if args.save and r == 0 and i == args.save_index else [])
            )
            res["overhead"] = res["seconds"] / base["seconds"] - 1.0
            runs.append({"round": r, "tree": tree, **res})
            last = res["history"][-1] if res["history"] else {}
            print(
                f"round {r}: {tree}: {res['seconds']:.1f} s (+{100 * res['overhead']:.1f} %), readings "
                f"{[round(h['xattn/seconds'] or 0, 1) for h in res['history']]} s, last pearson_corrected "
                f"{last.get('xattn/encoder_spes/pearson_corrected')}, n_masks {last.get('xattn/encoder_spes/n_masks')}",
                flush=True,
            )
    summary = {
        tree: {
            "overhead_median": statistics.median(x["overhead"] for x in runs if x["tree"] == tree),
            "readings_s": [h["xattn/seconds"] for x in runs if x["tree"] == tree for h in x["history"]],
        }
        for tree in trees
    }
    report = {"argv": argv or sys.argv[1:], "runs": runs, "summary": summary, "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
