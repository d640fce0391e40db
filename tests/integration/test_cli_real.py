import re

from xattn_lightning.cli import main


def test_timestamps_command_writes_word_cues_and_scores_them(tmp_path, capsys, whisper_path):
    import json
    import os

    import pytest

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    from pathlib import Path

    lines = Path(timed).read_text().splitlines()
    base = Path(timed).parent
    one = [c if i != 1 else str(base / c) for i, c in enumerate(lines[1].split("\t"))]
    manifest = tmp_path / "m.tsv"
    manifest.write_text(lines[0] + "\n" + "\t".join(one) + "\n")
    uid = one[0]

    assert main(["timestamps", whisper_path, "--manifest", str(manifest), "--format", "json", "--heads", "agreement", "--n-masks", "32",
                 "--out", str(tmp_path / "w.json"), "--quiet"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    words = json.loads((tmp_path / "w.json").read_text())[uid]
    assert len(words) >= 5 and all(w["start"] <= w["end"] for w in words)
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))  # in time order
    mae = float(re.search(r"mean error ([\d.]+) ms", err).group(1))
    assert 0 < mae < 150, err  # docs/timestamps.md: about 50 ms on this speech

    assert main(["timestamps", whisper_path, "--manifest", str(manifest), "--format", "vtt",
                 "--out", str(tmp_path / "vtt"), "--quiet"]) == 0  # fmt: skip
    vtt = (tmp_path / "vtt" / f"{uid}.vtt").read_text().splitlines()
    assert vtt[0] == "WEBVTT"
    cues = [line for line in vtt if "-->" in line]
    assert len(cues) >= 5 and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", cues[0])

    assert main(["timestamps", whisper_path, "--manifest", str(manifest), "--plain", "--quiet"]) == 0
    plain_mae = float(re.search(r"mean error ([\d.]+) ms", capsys.readouterr().err).group(1))
    assert plain_mae != mae  # plain DTW: no duration prior, no silences

    assert main(["timestamps", whisper_path, "--manifest", str(manifest), "--format", "srt", "--quiet"]) == 2
    assert "--out DIRECTORY" in capsys.readouterr().err
