import re

from xattn_lightning.cli import main


def test_demo_runs_and_writes_report(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--train-size", "64", "--n-masks", "16", "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3
    out = capsys.readouterr().out
    assert re.search(r"ρ\(CA, SM_X\): [+-]\d\.\d{3} after epoch 1 -> [+-]\d\.\d{3}", out)
    assert "wandb sync" in out
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


