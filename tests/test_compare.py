"""``compare_checkpoints`` and ``xattn-lightning compare``: results, files, and one-line errors."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TinyWhisperModule, speaking_tiny_whisper, tiny_extractor, tiny_whisper

from xattn_lightning.audio import read_manifest
from xattn_lightning.cli import main
from xattn_lightning.compare import compare_checkpoints, write_comparison
from xattn_lightning.errors import XAttnError


def _manifest(tmp_path: Path, n: int = 3, seconds: float = 0.6) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        wav = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        sf.write(tmp_path / f"a{i}.wav", wav, 16000)
        lines.append(f"utt{i}\ta{i}.wav\thello world")
    path = tmp_path / "m.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_two_models_side_by_side(tmp_path):
    rows = read_manifest(_manifest(tmp_path))
    a, b = speaking_tiny_whisper(0), speaking_tiny_whisper(1)
    comp = compare_checkpoints(
        [a, b],
        rows,
        processor=tiny_extractor(),
        names=["a", "b"],
        methods=("encoder_spes", "saliency"),
        n_masks=16,
        progress=False,
        batch_size=2,
    )
    assert [r.name for r in comp.results] == ["a", "b"]
    assert comp.probe_ids == ["utt0", "utt1", "utt2"]
    for r in comp.results:
        assert [row["id"] for row in r.rows] == comp.probe_ids
        assert math.isnan(r.wer)  # no tokenizer: no text to score
        assert -1 <= r.scalars["encoder_spes/pearson"] <= 1
        assert len(r.grids["saliency"]) == 2 and len(r.grids["saliency"][0]) == 4
    # different weights, different numbers; the same model twice gives the same numbers
    assert comp.results[0].scalars != comp.results[1].scalars
    again = compare_checkpoints(
        [a],
        rows,
        processor=tiny_extractor(),
        methods=("encoder_spes", "saliency"),
        n_masks=16,
        progress=False,
        batch_size=3,
    )
    assert again.results[0].scalars == pytest.approx(comp.results[0].scalars, nan_ok=True)
    table = comp.table()
    assert table.splitlines()[0].split() == ["a", "b"] and "encoder_spes/pearson" in table
    files = write_comparison(comp, tmp_path / "out")
    with files["csv"].open() as fh:
        got = list(csv.DictReader(fh))
    assert [g["checkpoint"] for g in got] == ["a", "b"]
    assert float(got[1]["encoder_spes/pearson"]) == pytest.approx(comp.results[1].scalars["encoder_spes/pearson"])
    data = json.loads(files["json"].read_text())
    assert len(data["checkpoints"][0]["probes"]) == 3
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["heatmaps_utt0.png", "heatmaps_utt1.png", "layers_encoder_spes.png", "layers_saliency.png"]


def test_compare_reports_unexplainable_probes(tmp_path):
    rows = read_manifest(_manifest(tmp_path, n=2))
    silent = tiny_whisper(seed=0)  # generates only special tokens: nothing to explain
    with pytest.raises(XAttnError, match="no probe utterance could be explained.*only special tokens"):
        compare_checkpoints([silent], rows, processor=tiny_extractor(), n_masks=8, progress=False)


def _tiny_ckpt(tmp_path: Path, seed: int) -> Path:
    """A Lightning checkpoint of a tiny Whisper module after one training step."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(seed)
    data = TensorDataset(torch.randn(2, 16, 200), torch.randint(0, 50, (2, 5)))
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(TinyWhisperModule(seed), DataLoader(data, batch_size=2))
    path = tmp_path / f"step-{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_cli_compare_lightning_checkpoints(tmp_path, capsys):
    ckpts = [_tiny_ckpt(tmp_path, seed) for seed in (0, 1)]
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            *map(str, ckpts),
            "--manifest",
            str(_manifest(tmp_path, n=2)),
            "--module",
            "helpers:TinyWhisperModule",
            "--n-masks",
            "8",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert any(line.split() == ["step-0", "step-1"] for line in captured.out.splitlines())
    with (out / "comparison.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [g["checkpoint"] for g in got] == ["step-0", "step-1"]
    assert got[0]["encoder_spes/pearson"] != got[1]["encoder_spes/pearson"]


@pytest.mark.timeout(300)
def test_cli_compare_with_lightning_ddp_two_processes_matches_one(tmp_path):
    """--devices 2 --strategy ddp: Lightning re-launches the command per rank, each rank explains its
    share, rank 0 gathers and writes; the table equals the single-process one."""
    import os
    import subprocess
    import sys

    ckpt = _tiny_ckpt(tmp_path, 0)
    manifest = _manifest(tmp_path, n=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outs = {}
    for label, extra in (("single", []), ("ddp", ["--devices", "2", "--strategy", "ddp"])):
        cmd = [
            sys.executable,
            "-m",
            "xattn_lightning",
            "compare",
            str(ckpt),
            "--manifest",
            str(manifest),
            "--module",
            "helpers:TinyWhisperModule",
            "--n-masks",
            "8",
            "--out",
            str(tmp_path / label),
            *extra,
        ]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[label] = (tmp_path / label / "comparison.csv").read_text()
        if label == "ddp":
            assert "MEMBER: 2/2" in res.stderr + res.stdout
    assert outs["ddp"].splitlines()[1].split(",")[:8] == outs["single"].splitlines()[1].split(",")[:8]
    with pytest.raises(XAttnError, match="strategy='ddp'"):
        compare_checkpoints(
            [tiny_whisper()],
            read_manifest(manifest),
            processor=tiny_extractor(),
            trainer_kwargs={"strategy": "ddp_spawn", "devices": 2},
        )


def _run(capsys, *argv):
    rc = main(["compare", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_bad_input_one_line_errors(tmp_path, capsys):
    good = _manifest(tmp_path, n=1)
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    bad_rows = tmp_path / "bad.tsv"
    bad_rows.write_text("u1\tonly-two-fields\n")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    unreadable = tmp_path / "unreadable.tsv"
    unreadable.write_text("u1\tgarbage.wav\thello\n")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    cases = [
        ((tmp_path / "missing_dir", "--manifest", good), "does not exist"),
        ((model_dir, "--manifest", tmp_path / "missing.tsv"), "does not exist"),
        ((model_dir, "--manifest", bad_rows), "expected 3 tab-separated fields"),
        ((model_dir, "--manifest", unreadable), "Cannot read audio"),
        ((model_dir, "--manifest", good), "not a speech-to-text"),
        ((ckpt, "--manifest", good), "--module"),
        ((ckpt, "--manifest", good, "--module", "no_such_pkg.mod:Cls"), "Cannot import"),
        ((ckpt, "--manifest", good, "--module", "nocolon"), "package.module:Class"),
        ((tmp_path / "missing.ckpt", "--manifest", good), "does not exist"),
        ((model_dir, "--manifest", good, "--methods", "nope"), "nope"),
    ]
    for argv, needle in cases:
        rc, err = _run(capsys, *argv)
        assert rc != 0, argv
        assert len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("xattn-lightning: error:") and needle in err, (argv, err)
        assert "Traceback" not in err


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
