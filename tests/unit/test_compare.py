"""``compare_checkpoints`` and ``xattn-lightning compare``: results, files, and one-line errors."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TinyWhisperModule, noise_manifest, speaking_tiny_whisper, tiny_extractor, tiny_whisper

from xattn_lightning.audio import read_manifest
from xattn_lightning.cli import main
from xattn_lightning.compare import compare_checkpoints
from xattn_lightning.compare_report import write_comparison
from xattn_lightning.errors import XAttnError


def test_compare_two_models_side_by_side(tmp_path):
    rows = read_manifest(noise_manifest(tmp_path))
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
        assert [p.id for p in r.summary.probes] == comp.probe_ids
        assert math.isnan(r.wer)  # no tokenizer: no text to score
        assert -1 <= r.summary.scalars["encoder_spes/pearson"] <= 1
        assert len(r.summary.grids["saliency"]) == 2 and len(r.summary.grids["saliency"][0]) == 4
    # different weights, different numbers; the same model twice gives the same numbers
    assert comp.results[0].summary.scalars != comp.results[1].summary.scalars
    again = compare_checkpoints(
        [a],
        rows,
        processor=tiny_extractor(),
        methods=("encoder_spes", "saliency"),
        n_masks=16,
        progress=False,
        batch_size=3,
    )
    assert again.results[0].summary.scalars == pytest.approx(comp.results[0].summary.scalars, nan_ok=True)
    table = comp.table()
    assert table.splitlines()[0].split() == ["a", "b"] and "encoder_spes/pearson" in table
    files = write_comparison(comp, tmp_path / "out")
    with files["csv"].open() as fh:
        got = list(csv.DictReader(fh))
    assert [g["checkpoint"] for g in got] == ["a", "b"]
    assert float(got[1]["encoder_spes/pearson"]) == pytest.approx(comp.results[1].summary.scalars["encoder_spes/pearson"])
    data = json.loads(files["json"].read_text())
    assert len(data["checkpoints"][0]["probes"]) == 3
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["heatmaps_utt0.png", "heatmaps_utt1.png", "layers_encoder_spes.png", "layers_saliency.png"]


def test_compare_reports_unexplainable_probes(tmp_path):
    rows = read_manifest(noise_manifest(tmp_path, n=2))
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
            str(noise_manifest(tmp_path, n=2)),
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
    manifest = noise_manifest(tmp_path, n=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
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
    good = noise_manifest(tmp_path, n=1)
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






def test_compare_takes_probe_batches_in_a_scripts_layout(tmp_path):
    """Batches of one utterance as a script pairs them, (BatchFeature, BatchEncoding), read as the monitor reads
    them, give the numbers the same utterances give as manifest rows."""
    from helpers import processor_batch

    rows = read_manifest(noise_manifest(tmp_path))
    models = [speaking_tiny_whisper(0)]
    kw = {"methods": ("encoder_spes",), "n_masks": 16, "progress": False}
    by_rows = compare_checkpoints(models, rows, processor=tiny_extractor(), **kw)
    from transformers import BatchEncoding

    y = torch.tensor([[51, 5, 6, 50]])
    batches = [(processor_batch(tiny_extractor(), [r]), BatchEncoding({"input_ids": y})) for r in rows]
    by_batches = compare_checkpoints(models, batches, **kw)
    assert by_batches.probe_ids == ["probe0", "probe1", "probe2"]
    a, b = by_rows.results[0].summary.scalars, by_batches.results[0].summary.scalars
    assert a["encoder_spes/pearson"] == pytest.approx(b["encoder_spes/pearson"], abs=1e-6)
    with pytest.raises(XAttnError, match="one utterance each"):
        compare_checkpoints(models, [(torch.cat([batches[0][0]["input_features"]] * 2), y.repeat(2, 1))], **kw)
