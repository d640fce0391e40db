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


def test_the_default_head_set_is_chosen_once_then_read_back_by_later_runs(tmp_path, capsys, monkeypatch, whisper_path):
    import os

    import pytest

    from xattn_lightning.timestamps import choice

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    from pathlib import Path

    monkeypatch.setenv("XATTN_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choice, "CHOICE_UTTERANCES", 2)  # the choice final after 2 utterances: a short test
    lines = Path(timed).read_text().splitlines()
    base = Path(timed).parent
    rows = [[c if i != 1 else str(base / c) for i, c in enumerate(line.split("\t"))] for line in lines[1:4]]
    manifest = tmp_path / "m.tsv"
    manifest.write_text(lines[0] + "\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    argv = ["timestamps", whisper_path, "--manifest", str(manifest), "--quiet", "--out"]

    def run(out: str, *extra: str) -> str:
        assert main([*argv, str(tmp_path / out), *extra]) == 0
        return capsys.readouterr().err

    first = run("1.tsv")
    assert re.search(r"head set: \S+ \(\d+ heads\), chosen on 2 utterances; kept in .*cache.heads.*\.json", first), first
    _real = choice.choose_heads_from
    monkeypatch.setattr(choice, "choose_heads_from", lambda *a, **k: pytest.fail("chose again"))
    second = run("2.tsv")  # a new process would load a new model: the same weights, read back from disk
    assert "read back from" in second and "--choose-again" in second, second
    # the first run timed the choosing utterances together, the second one by one: the same words and times
    assert (tmp_path / "1.tsv").read_text() == (tmp_path / "2.tsv").read_text()
    one = tmp_path / "one.tsv"  # a job of one utterance, the choice made beforehand on other speech
    one.write_text(lines[0] + "\n" + "\t".join(rows[0]) + "\n")
    argv[3] = str(one)
    monkeypatch.setattr(choice, "choose_heads_from", _real)
    chosen = run("4.tsv", "--choose-on", str(manifest))
    assert re.search(rf"chosen on 3 utterances of {re.escape(str(manifest))}; kept in ", chosen), chosen
    assert main([*argv, str(tmp_path / "5.tsv"), "--heads", "all", "--choose-on", str(manifest)]) == 2
    assert "leave --heads at auto" in capsys.readouterr().err
    again = run("3.tsv", "--choose-again")  # forgotten, chosen on the one utterance: short of 2, not kept
    assert "chosen on 1 utterances; not kept" in again, again


def _timed_rows():
    import os

    import pytest

    from xattn_lightning.audio import read_manifest

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    return read_manifest(timed)


def test_audio_longer_than_the_window_is_timed_piece_by_piece_to_its_end(tmp_path, capsys, whisper_path):
    import json

    import numpy as np
    import soundfile as sf

    from xattn_lightning.audio import load_audio

    parts, words, t = [], [], 0.0
    for r in _timed_rows()[:12]:  # about 40 s of speech with its true word times
        w = load_audio(r.audio).numpy()
        parts += [w, np.zeros(6400, dtype=np.float32)]
        words += [[x, a + t, b + t] for x, a, b in r.words]
        t += (len(w) + 6400) / 16000
    assert t > 35
    sf.write(tmp_path / "long.wav", np.concatenate(parts), 16000)
    sf.write(tmp_path / "silence.wav", np.zeros(3 * 16000, dtype=np.float32), 16000)
    (tmp_path / "m.tsv").write_text(f"id\taudio\ttext\twords\nlong\tlong.wav\t-\t{json.dumps(words)}\n"
                                    f"quiet\tsilence.wav\t-\t[]\n")  # fmt: skip
    assert main(["timestamps", whisper_path, "--manifest", str(tmp_path / "m.tsv"), "--heads", "all", "--quiet",
                 "--format", "json", "--out", str(tmp_path / "w.json")]) == 0  # fmt: skip
    out = json.loads((tmp_path / "w.json").read_text())
    got = out["long"]
    assert out["quiet"] == []  # no invented words for pure silence
    assert got[-1]["end"] > 33 and len(got) > 0.8 * len(words)  # nothing cut off at 30 s
    assert all(a["start"] <= b["start"] for a, b in zip(got, got[1:]))
    err = capsys.readouterr().err
    assert "no words for 1 silent stretch(es)" in err and "quiet" in err, err
    mae = float(re.search(r"mean error ([\d.]+) ms", err).group(1))
    assert mae < 100, err  # docs/timestamps.md: 43 ms on 46-s files of this speech, 36 ms as single utterances


def test_text_times_the_manifest_s_words_instead_of_the_transcript(tmp_path, capsys, whisper_path):
    r = _timed_rows()[0]
    text = "completely different words than were spoken here"
    (tmp_path / "m.tsv").write_text(f"id\taudio\ttext\nu\t{r.audio}\t{text}\n")
    assert main(["timestamps", whisper_path, "--manifest", str(tmp_path / "m.tsv"), "--heads", "all", "--text",
                 "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()[1:]
    assert [line.split("\t")[1] for line in out] == text.split()
