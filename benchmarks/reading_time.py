"""Seconds of the monitor's readings with the package of a given source tree, to compare two versions of the
monitor on the same fit (tests/integration/test_recorded_reading.py's: real tiny.en, 2 timed probes, 256 masks, 2 readings).

    python benchmarks/reading_time.py /path/to/old/tree; python benchmarks/reading_time.py .   # interleave a few

Needs ``XL_WHISPER_PATH`` and ``XL_TIMED_MANIFEST``. Prints one JSON line: the tree, each reading's seconds and
the last reading's ρ. Results of the restructuring of issue 22: ``benchmarks/results/reading_time_refactor.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(tree: str) -> dict:
    tree = str(Path(tree).resolve())
    sys.path[:0] = [tree, str(Path(tree) / "tests")]
    import xattn_lightning
    import xattn_lightning.callbacks.monitor as mm

    assert xattn_lightning.__file__.startswith(tree), f"imported {xattn_lightning.__file__}, not the tree's package"
    here = Path(__file__).resolve().parent.parent / "tests" / "integration" / "test_recorded_reading.py"
    spec = importlib.util.spec_from_file_location("recorded_reading", here)
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    seconds: list[float] = []
    run = mm.XAttnSaliencyMonitor.run

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = run(self, *args, **kwargs)
        seconds.append(time.perf_counter() - t)
        return out

    mm.XAttnSaliencyMonitor.run = timed
    with tempfile.TemporaryDirectory() as d:
        history = rec._reading(os.environ["XL_WHISPER_PATH"], os.environ["XL_TIMED_MANIFEST"], Path(d))
    return {"tree": tree, "reading_s": seconds, "pearson": history[-1]["xattn/encoder_spes/pearson"]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else ".")))
