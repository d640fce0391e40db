"""``compare_checkpoints`` and ``xattn-lightning compare``: results, files, and one-line errors."""

import csv
import json
import math

import pytest
import torch

from xattn_lightning.audio import read_manifest
from xattn_lightning.cli import main
from xattn_lightning.errors import XAttnError


@pytest.mark.integration
def test_cli_compare_real_whisper_before_and_after_finetune(
    tmp_path, capsys, monkeypatch, whisper_path, espeak_manifest
):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from xattn_lightning.loading import features_batch, tokenize_labels

    monkeypatch.setenv("WANDB_MODE", "offline")
    # a short real fine-tune: three AdamW steps on two espeak utterances
    model = WhisperForConditionalGeneration.from_pretrained(whisper_path)
    proc = WhisperProcessor.from_pretrained(whisper_path)
    rows = read_manifest(espeak_manifest)[:2]
    batch = features_batch(proc, rows)
    labels = tokenize_labels(proc, [r.text for r in rows])[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(3):
        loss = model(input_features=batch["input_features"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    proc.save_pretrained(tuned)
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            whisper_path,
            str(tuned),
            "--manifest",
            espeak_manifest,
            "--num-probes",
            "2",
            "--n-masks",
            "32",
            "--names",
            "base,tuned",
            "--out",
            str(out),
            "--wandb",
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    assert any(line.split() == ["base", "tuned"] for line in stdout.splitlines())  # the table's header
    wer_line = next(line for line in stdout.splitlines() if line.startswith("wer"))
    wers = [float(v) for v in wer_line.split()[1:]]
    assert all(0.0 <= w <= 100.0 for w in wers)
    with (out / "comparison.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [g["checkpoint"] for g in got] == ["base", "tuned"]
    for g in got:
        assert -1.0 <= float(g["encoder_spes/pearson"]) <= 1.0
        assert math.isfinite(float(g["encoder_spes/pearson_layer3"]))
    assert (out / "layers_encoder_spes.png").stat().st_size > 0
    assert len(list(out.glob("heatmaps_*.png"))) == 2
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.integration
def test_a_peft_adapter_directory_loads_merged_onto_its_base_and_compares(
    tmp_path, whisper_path, espeak_manifest, monkeypatch
):
    import sys

    from helpers import lora_model
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from xattn_lightning.loading import features_batch, load_hf_model

    base = WhisperForConditionalGeneration.from_pretrained(whisper_path).eval()
    pm = lora_model(base, scale=0.02).eval()
    lora = tmp_path / "lora"
    pm.save_pretrained(lora)  # adapter weights only, and the base's path in adapter_config.json
    assert (lora / "adapter_config.json").is_file() and not (lora / "config.json").exists()
    model, proc = load_hf_model(str(lora))
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    assert not any("lora" in n for n, _ in model.named_modules())  # merged into an ordinary model
    batch = features_batch(WhisperProcessor.from_pretrained(whisper_path), read_manifest(espeak_manifest)[:1])
    ids = torch.tensor([[50257, 50362, 440]])
    with torch.no_grad():
        want = pm(input_features=batch["input_features"], decoder_input_ids=ids).logits
        got = model(input_features=batch["input_features"], decoder_input_ids=ids).logits
        plain = (
            WhisperForConditionalGeneration.from_pretrained(whisper_path)
            .eval()(input_features=batch["input_features"], decoder_input_ids=ids)
            .logits
        )
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the adapter changes the model
    out = tmp_path / "cmp"
    rc = main(["compare", whisper_path, str(lora), "--manifest", espeak_manifest, "--num-probes", "1",
               "--n-masks", "16", "--names", "base,lora", "--out", str(out)])  # fmt: skip
    assert rc == 0
    with (out / "comparison.csv").open() as fh:
        assert [r["checkpoint"] for r in csv.DictReader(fh)] == ["base", "lora"]
    (tmp_path / "nobase").mkdir()
    (tmp_path / "nobase" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(XAttnError, match="base_model"):
        load_hf_model(str(tmp_path / "nobase"))
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(XAttnError, match="install peft"):
        load_hf_model(str(lora))
