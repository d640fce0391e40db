"""The examples, run in a shortened mode: custom model on generated audio (always), Whisper tiny.en
fine-tuned on the espeak speech (integration: needs XL_WHISPER_PATH and XL_ESPEAK_MANIFEST)."""

import csv
import glob
import math

import pytest
import torch
from helpers import load_example, manifest_rows
from wandb_reader import history


@pytest.mark.integration
def test_finetune_whisper_example_shortened(tmp_path, monkeypatch, whisper_path, espeak_manifest):
    """Issue 4/5: real Whisper tiny.en fine-tuned for a few steps on espeak speech, monitor on."""
    from transformers import WhisperForConditionalGeneration

    monkeypatch.setenv("WANDB_MODE", "offline")
    ex = load_example("finetune_whisper")
    save = tmp_path / "tuned"
    res = ex.main(
        [
            "--model",
            whisper_path,
            "--manifest",
            espeak_manifest,
            "--epochs",
            "2",
            "--limit-train-batches",
            "2",
            "--limit-val-batches",
            "1",
            "--batch-size",
            "2",
            "--num-probes",
            "2",
            "--n-masks",
            "32",
            "--lr",
            "1e-4",
            "--out",
            str(tmp_path / "run"),
            "--save",
            str(save),
            "--max-overhead",
            "none",
        ]
    )
    hist = res["history"]
    assert [h["step"] for h in hist] == [2, 4]  # after each epoch, at the global step
    for h in hist:
        assert h["xattn/num_probes"] == 2.0 and h["xattn/num_failed"] == 0.0
        assert -1.0 <= h["xattn/encoder_spes/pearson"] <= 1.0
        assert all(math.isfinite(h[f"xattn/encoder_spes/pearson_layer{i}"]) for i in range(4))
    # real speech: attention and encoder saliency point the same way
    assert hist[-1]["xattn/encoder_spes/pearson"] > 0.0
    assert res["head_ranking"]["encoder_spes"][0][2] >= hist[-1]["xattn/encoder_spes/pearson_layer0"]
    (run_file,) = glob.glob(str(tmp_path / "run/wandb/offline-run-*/run-*.wandb"))
    rows = history(run_file)
    logged = [r for r in rows if "xattn/encoder_spes/pearson" in r]
    # at the step of the validation metrics they belong to (one before the global step after the epoch)
    assert [r["trainer/global_step"] for r in logged] == [r["trainer/global_step"] for r in rows if "val_loss" in r]
    assert [r["trainer/global_step"] for r in logged] == [1, 3]
    assert [r["xattn/encoder_spes/pearson"] for r in logged] == pytest.approx(
        [h["xattn/encoder_spes/pearson"] for h in hist]
    )
    assert sum(r.get("xattn/heatmaps/_type") == "images/separated" for r in rows) == 2
    assert sum(r.get("xattn/probes/_type") == "table-file" for r in rows) == 2
    # the fine-tune changed the weights, and the saved model loads
    before = WhisperForConditionalGeneration.from_pretrained(whisper_path)
    after = WhisperForConditionalGeneration.from_pretrained(save)
    w0 = before.model.decoder.layers[0].fc1.weight
    w1 = after.model.decoder.layers[0].fc1.weight
    assert not torch.equal(w0, w1)


@pytest.mark.integration
def test_finetune_whisper_example_with_lora_then_compare(tmp_path, whisper_path, espeak_manifest, capsys):
    """LoRA fine-tuning with the monitor on, the adapter saved, then compared with its base model."""
    pytest.importorskip("peft", reason="peft is in the dev extras")
    from xattn_lightning.cli import main as cli

    ex = load_example("finetune_whisper")
    save = tmp_path / "lora"
    res = ex.main(
        ["--model", whisper_path, "--manifest", espeak_manifest, "--epochs", "1", "--limit-train-batches", "2",
         "--limit-val-batches", "1", "--batch-size", "2", "--num-probes", "1", "--n-masks", "16", "--lr", "1e-3",
         "--lora", "4", "--out", str(tmp_path / "run"), "--save", str(save), "--no-wandb", "--max-overhead", "none"]
    )  # fmt: skip
    assert type(res["trainer"].lightning_module.model).__name__.startswith("PeftModel")
    (h,) = res["history"]
    assert h["xattn/num_failed"] == 0.0 and -1.0 <= h["xattn/encoder_spes/pearson"] <= 1.0
    assert (save / "adapter_config.json").is_file() and not (save / "config.json").exists()
    out = tmp_path / "cmp"
    rc = cli(["compare", whisper_path, str(save), "--manifest", espeak_manifest, "--num-probes", "1",
              "--n-masks", "16", "--names", "base,lora", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    with (out / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["checkpoint"] for r in rows] == ["base", "lora"]
    assert all(-1.0 <= float(r["encoder_spes/pearson"]) <= 1.0 for r in rows)


@pytest.mark.integration
def test_finetune_whisper_example_with_the_alignment_loss(tmp_path, whisper_path):
    """--alignment-loss on timed speech: the loss is logged at each step, it falls, and the trained heads are in
    the saved generation config (what return_token_timestamps then uses)."""
    import os

    from transformers import GenerationConfig

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path (training speech with true word timings)")
    manifest = manifest_rows(timed, slice(0, 2), tmp_path / "train.tsv")
    save = tmp_path / "tuned"
    ex = load_example("finetune_whisper")
    argv = ["--model", whisper_path, "--manifest", str(manifest), "--epochs", "4", "--batch-size", "2",
            "--lr", "1e-4", "--freeze-encoder", "--num-probes", "1", "--n-masks", "8", "--max-overhead", "none",
            "--alignment-loss", "1.0", "--alignment-heads", "3:1,2:0", "--no-wandb", "--accelerator", "cpu",
            "--out", str(tmp_path / "run"), "--save", str(save)]  # fmt: skip
    ex.main(argv)
    (path,) = glob.glob(str(tmp_path / "run/csv/*/metrics.csv"))
    with open(path) as fh:
        losses = [float(r["train_alignment_loss"]) for r in csv.DictReader(fh) if r.get("train_alignment_loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert GenerationConfig.from_pretrained(save).alignment_heads == [[3, 1], [2, 0]]
    with pytest.raises(ex.XAttnError, match="L:H"):
        ex.main([*argv[:-4], "--alignment-heads", "3-1", "--out", str(tmp_path / "bad")])
