"""The monitor in Hugging Face Trainer fine-tunes (``XAttnSaliencyCallback``): the recipe's Seq2SeqTrainer on the
real Whisper tiny.en (integration), several processes against one, and what it says when it cannot work."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
from helpers import load_example, manifest_rows
from wandb_reader import history


def test_seq2seq_trainer_recipe_on_real_whisper(whisper_path, espeak_manifest, tmp_path, monkeypatch):
    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path (the probes' true word timings)")
    import wandb

    train = manifest_rows(espeak_manifest, slice(0, 4), tmp_path / "train.tsv")
    evaluation = manifest_rows(timed, slice(0, 2), tmp_path / "eval.tsv")
    example = load_example("finetune_whisper_hf_trainer")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # W&B reads WANDB_DIR once per process; its default is the working directory
    common = ["--model", whisper_path, "--manifest", str(train), "--eval-manifest", str(evaluation), "--max-steps", "2",
              "--eval-steps", "1", "--batch-size", "2", "--num-probes", "2", "--n-masks", "32"]  # fmt: skip
    with pytest.warns(UserWarning, match="pearson_corrected is not logged"):  # 32 masks: below the floor, said once
        on = example.main([*common, "--out", str(tmp_path / "on"), "--report-to", "wandb", "--max-overhead", "none"])
    assert wandb.run is not None and wandb.run.offline, "the Trainer's W&B integration left no offline run"
    run_dir = Path(wandb.run.dir).parent  # WANDB_DIR is read once per process: ask the run where it is
    wandb.finish()
    off = example.main([*common, "--out", str(tmp_path / "off"), "--report-to", "none", "--no-monitor"])

    readings = [h for h in on["log_history"] if "xattn/encoder_spes/pearson" in h]
    assert [h["step"] for h in readings] == [1, 2]  # after each evaluation, at its step
    for h in readings:
        assert h["xattn/num_probes"] == 2 and h["xattn/num_failed"] == 0
        assert -1 <= h["xattn/encoder_spes/pearson"] <= 1 and h["xattn/encoder_spes/n_masks"] == 32
        assert 0 <= h["xattn/timestamps/mae_ms"] < 500  # the timed probes' words, carried past the collator
    assert not any("xattn/" in k for h in off["log_history"] for k in h)

    (run_file,) = glob.glob(str(run_dir / "run-*.wandb"))
    logged = history(run_file)
    scalars = [r for r in logged if "train/xattn/encoder_spes/pearson" in r]  # the Trainer's W&B key prefix
    assert [r["train/global_step"] for r in scalars] == [1, 2]
    assert [r["train/xattn/encoder_spes/pearson"] for r in scalars] == pytest.approx(
        [h["xattn/encoder_spes/pearson"] for h in readings]
    )
    assert [r["train/xattn/heatmaps/count"] for r in logged if "train/xattn/heatmaps/count" in r] == [2, 2]
    assert sum(r.get("train/xattn/probes/_type") == "table-file" for r in logged) == 2

    for (name, a), b in zip(on["model"].state_dict().items(), off["model"].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs: the callback changed training"
