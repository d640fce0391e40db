"""What ``xattn-lightning compare`` costs at its defaults against a 256-mask comparison of the same checkpoints,
source trees side by side in one run (issue 34).

Each comparison runs as ``python -m xattn_lightning compare`` in its own process with ``PYTHONPATH`` the tree;
the settings are interleaved in ``--rounds`` rounds. ``tree@256`` reads at 256 masks, ``tree`` at the defaults
(``n_masks="auto"``), ``tree@bf16`` at the defaults with ``vocabulary="bf16"`` (through the library: the CLI has
no such flag). Prints and writes one JSON: each run's wall seconds and the ratio of each setting to the first.

    python -m benchmarks.compare_cost --checkpoints base,ft --manifest probes.tsv --settings .@256,.,/old
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

_BF16 = r"""
import sys, time
from xattn_lightning.audio import read_manifest
from xattn_lightning.compare import compare_checkpoints
rows = read_manifest(sys.argv[1])
comp = compare_checkpoints(sys.argv[2:], rows, progress=False, vocabulary="bf16")
print(comp.table())
"""


def run(setting: str, checkpoints: list[str], manifest: str) -> dict:
    tree, _, variant = setting.partition("@")
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    manifest = str(Path(manifest).resolve())
    checkpoints = [str(Path(c).resolve()) if Path(c).exists() else c for c in checkpoints]
    with tempfile.TemporaryDirectory() as out:
        if variant == "bf16":
            cmd = [sys.executable, "-c", _BF16, manifest, *checkpoints]
        else:
            cmd = [sys.executable, "-m", "xattn_lightning", "compare", *checkpoints, "--manifest", manifest]
            cmd += ["--out", out] + (["--n-masks", variant] if variant else [])
        t = time.perf_counter()
        # run elsewhere: Python puts the current directory (a source tree, maybe another one) before PYTHONPATH
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=out)
        seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{proc.stderr[-3000:]}")
    table = [x for x in proc.stdout.splitlines() if "pearson_corrected" in x or "masks per map" in x]
    return {"setting": setting, "seconds": seconds, "table": table}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", required=True, help="comma-separated checkpoints")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--settings", required=True, help="comma-separated tree[@256|@bf16]; ratios are to the first")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compare_cost_cpu.json")
    args = ap.parse_args(argv)
    settings = args.settings.split(",")
    runs = []
    for r in range(args.rounds):
        for s in settings:
            res = run(s, args.checkpoints.split(","), args.manifest)
            runs.append({"round": r, **res})
            print(f"round {r}: {s}: {res['seconds']:.1f} s; " + " | ".join(res["table"]), flush=True)
    first = [x["seconds"] for x in runs if x["setting"] == settings[0]]
    ratios = {
        s: statistics.median(x["seconds"] / f for x, f in zip([x for x in runs if x["setting"] == s], first))
        for s in settings
    }
    report = {"argv": argv or sys.argv[1:], "runs": runs, "ratio_to_first": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
