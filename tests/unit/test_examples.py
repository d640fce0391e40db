"""The examples, run in a shortened mode: custom model on generated audio (always), Whisper tiny.en
fine-tuned on the espeak speech (integration: needs XL_WHISPER_PATH and XL_ESPEAK_MANIFEST)."""

import glob
import math

from helpers import load_example, tone_manifest
from wandb_reader import history


def test_custom_model_example_shortened(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ex = load_example("custom_model")
    manifest = tone_manifest(tmp_path)
    res = ex.main(
        [
            "--manifest",
            str(manifest),
            "--epochs",
            "2",
            "--every-n-epochs",
            "1",
            "--num-probes",
            "2",
            "--n-masks",
            "16",
            "--batch-size",
            "3",
            "--out",
            str(tmp_path / "run"),
            "--max-overhead",
            "none",
        ]
    )
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        assert h["xattn/num_probes"] == 2.0 and h["xattn/num_failed"] == 0.0
        for m in ("spes", "encoder_spes"):
            assert math.isfinite(h[f"xattn/{m}/pearson"])
    (run_file,) = glob.glob(str(tmp_path / "run/wandb/offline-run-*/run-*.wandb"))
    logged = [r for r in history(run_file) if "xattn/spes/pearson" in r]
    assert [r["trainer/global_step"] for r in logged] == [h["log_step"] for h in hist]




