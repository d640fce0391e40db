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




def test_timestamps_refuses_an_out_path_of_the_wrong_kind_before_loading_anything(tmp_path, capsys):
    from helpers import tone_manifest

    m = str(tone_manifest(tmp_path, n=1))
    model = str(tmp_path / "no-model-here")  # never loaded: the arguments are checked first
    cases = [
        (["--format", "srt", "--out", str(tmp_path / "subs.srt")], "looks like a file"),
        (["--format", "vtt", "--out", str(tmp_path / "x.VTT")], "looks like a file"),
        (["--out", str(tmp_path) + "/"], "is a directory"),
        (["--format", "json", "--out", str(tmp_path)], "is a directory"),
    ]
    for extra, message in cases:
        assert main(["timestamps", model, "--manifest", m, *extra]) == 2
        assert message in capsys.readouterr().err


def test_timestamps_refuses_a_manifest_with_an_id_twice(tmp_path, capsys):
    (tmp_path / "u0.wav").write_bytes(b"")
    (tmp_path / "m.tsv").write_text("id\taudio\nu0\tu0.wav\nu0\tu0.wav\n")
    assert main(["timestamps", str(tmp_path / "none"), "--manifest", str(tmp_path / "m.tsv")]) == 2
    assert "has the id 'u0' twice" in capsys.readouterr().err


def test_timestamps_text_needs_a_text_for_every_utterance(tmp_path, capsys):
    (tmp_path / "u0.wav").write_bytes(b"")
    (tmp_path / "m.tsv").write_text("id\taudio\nu0\tu0.wav\n")
    assert main(["timestamps", str(tmp_path / "none"), "--manifest", str(tmp_path / "m.tsv"), "--text"]) == 2
    assert "has none: add a text column" in capsys.readouterr().err
