"""The examples, run in a shortened mode: custom model on generated audio (always), Whisper tiny.en
fine-tuned on the espeak speech (integration: needs XL_WHISPER_PATH and XL_ESPEAK_MANIFEST)."""

import csv
import glob
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from wandb_reader import history

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str, lightning: str = "lightning.pytorch"):
    """The example as a module; ``lightning="pytorch_lightning"``: as the same script written with
    ``import pytorch_lightning as pl`` (the other Lightning package) instead of ``lightning.pytorch``."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}_{lightning.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    source = path.read_text()
    if lightning != "lightning.pytorch":
        line = "import lightning.pytorch as pl\n"
        assert line in source, f"{path.name} does not import {line.strip()!r}"
        source = source.replace(line, f"import {lightning} as pl\n")
    exec(compile(source, str(path), "exec"), mod.__dict__)
    return mod


def _tone_manifest(tmp_path: Path, n: int = 6) -> Path:
    """Short tone sequences (one tone per character) and their 'transcripts'."""
    rng = np.random.default_rng(0)
    freqs = {"a": 300.0, "b": 700.0, "c": 1500.0}
    lines = []
    for i in range(n):
        text = "".join(rng.choice(list(freqs), size=3))
        t = np.arange(int(0.15 * 16000)) / 16000
        wav = np.concatenate([0.3 * np.sin(2 * np.pi * freqs[c] * t) for c in text]).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", wav, 16000)
        lines.append(f"u{i}\tu{i}.wav\t{text}")
    path = tmp_path / "manifest.tsv"
    path.write_text("id\taudio\ttext\n" + "\n".join(lines) + "\n")
    return path


def test_custom_model_example_shortened(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ex = _load("custom_model")
    manifest = _tone_manifest(tmp_path)
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


@pytest.mark.integration
def test_finetune_whisper_example_shortened(tmp_path, monkeypatch, whisper_path, espeak_manifest):
    """Issue 4/5: real Whisper tiny.en fine-tuned for a few steps on espeak speech, monitor on."""
    from transformers import WhisperForConditionalGeneration

    monkeypatch.setenv("WANDB_MODE", "offline")
    ex = _load("finetune_whisper")
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

    ex = _load("finetune_whisper")
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
