"""The benchmark scripts run end to end (tiny settings; the numbers themselves are in the README)."""

import json

import pytest


@pytest.mark.integration
def test_whisper_report_script_smoke(tmp_path, whisper_path, espeak_manifest):
    from benchmarks import whisper_report

    assert (
        whisper_report.main(
            [
                "--model",
                whisper_path,
                "--manifest",
                espeak_manifest,
                "--utterances",
                "1",
                "--n-masks",
                "4",
                "--encoder-n-masks",
                "8",
                "--deletion-step",
                "0.5",
                "--stability-ns",
                "",
                "--encoder-stability-ns",
                "",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "report.json").read_text())
    u = rep["utterances"][0]
    assert len(u["spes"]["grid"]) == 4 and len(u["spes"]["grid"][0]) == 6
    assert set(rep["deletion"]["deletion"]) == {"attention", "spes:pooled", "spes", "encoder_spes"}
    assert "| layer | ρ(CA, SM_X) | ρ(CA, SM_H) |" in (tmp_path / "report.md").read_text()


@pytest.mark.integration
def test_perf_fixed_cost_with_cached_encoder_on_real_whisper(tmp_path, whisper_path, espeak_manifest):
    from benchmarks import perf

    args = ["--model", whisper_path, "--manifest", espeak_manifest, "--only", "fixed", "--out", str(tmp_path)]
    assert perf.main(args) == 0
    r = json.loads((tmp_path / "perf.json").read_text())["fixed"]
    assert r["cache_hits"] == 3  # every timed call after the warm-up took the encoder output from the cache
    assert {"fixed_over_greedy", "fixed_cached_over_greedy"} <= r.keys()  # ratios only: no timing assertions


@pytest.mark.integration
def test_timestamps_benchmark_takes_a_whisper_of_another_size(tmp_path, whisper_path, espeak_manifest):
    """benchmarks/timestamps.py on any HF Whisper: a random one of another size (3 decoder layers x 2 heads,
    tiny.en's processor), every row there, the simple head rules among them."""
    import os

    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from benchmarks import timestamps
    from xattn_lightning.audio import read_manifest

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    sizes = dict(d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=128, decoder_ffn_dim=128)  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**WhisperConfig.from_pretrained(whisper_path).to_dict(), **sizes}))
    gen = GenerationConfig.from_pretrained(whisper_path)
    gen.alignment_heads, gen.max_length = [[2, 1], [1, 0]], 24  # the shipped heads of this size; short transcripts
    model.generation_config = gen
    path = tmp_path / "whisper-random-3x2"
    model.save_pretrained(path)
    WhisperProcessor.from_pretrained(whisper_path).save_pretrained(path)
    rows = read_manifest(timed)[:4]
    manifest = tmp_path / "timed.tsv"
    manifest.write_text(
        "id\taudio\ttext\twords\n"
        + "".join(f"{r.id}\t{r.audio}\t{r.text}\t{json.dumps(r.words)}\n" for r in rows)
    )
    argv = ["--model", str(path), "--timed", str(manifest), "--select", espeak_manifest, "--select-utterances", "1",
            "--n-masks", "8", "--train", "2", "--ks", "1", "--sweep", "8", "--sweep-seeds", "0", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert timestamps.main(argv) == 0
    report = json.loads((tmp_path / "timestamps.json").read_text())
    assert torch.tensor(report["agreement_grid"]).shape == (3, 2)
    names = {r["heads"] for r in report["rows"]}
    for want in ("all heads", "upper half of the layers, every head", "shipped alignment_heads",
                 "upper half of the layers, every head, sub-frame boundaries", "heads='agreement' + fusion at N = 8, seed 0",
                 "all heads, duration prior + silences (word_timestamps default)", "xl.word_timestamps() as called",
                 "shipped alignment_heads, silences", "all heads, prior weight 0.5 + silences, held out",
                 "all heads, transcript re-tokenised to characters",
                 "label-free per utterance: every head weighted by consistency^2 + fusion"):  # fmt: skip
        assert want in names, sorted(names)
    upper = next(r for r in report["rows"] if r["heads"] == "upper half of the layers, every head")
    assert upper["head_list"] == [[1, 0], [1, 1], [2, 0], [2, 1]]
    assert {r["method"] for r in report["rows"]} == {"openai", "transformers"}
    rows_by = {r["heads"]: r for r in report["rows"] if r["method"] == "openai"}
    # the default as called scores what its row computed from the same alignments
    called, computed = rows_by["xl.word_timestamps() as called"], rows_by["all heads, duration prior + silences (word_timestamps default)"]
    assert called["boundaries"] == computed["boundaries"]
    assert called["mae_ms"] == pytest.approx(computed["mae_ms"], nan_ok=True)  # nan when a random model gets no word right


def test_public_tools_benchmark_scores_each_tool_on_the_same_utterances(tmp_path, whisper_path):
    """benchmarks/public_tools.py on one held-out utterance: the tools asked for, each with its error and cost."""
    import os

    from benchmarks import public_tools

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    argv = ["--model", whisper_path, "--timed", timed, "--first-scored", "24", "--out", str(tmp_path),
            "--only", "xl.word_timestamps (default,openai-whisper word_timestamps=True,greedy decode"]  # fmt: skip
    assert public_tools.main(argv) == 0
    rows = {r["tool"]: r for r in json.loads((tmp_path / "public_tools.json").read_text())["rows"]}
    first, later = (n for n in rows if n.startswith("xl.word_timestamps (default"))
    assert "first run" in first and "later run" in later
    greedy = next(n for n in rows if "greedy decode" in n)
    assert set(rows) == {first, later, greedy, "openai-whisper word_timestamps=True (shipped heads)"}
    for name, r in rows.items():
        assert r["seconds_per_utterance"] > 0
        if name != greedy:
            assert r["boundaries"] >= 10 and 0 < r["mae_ms"] < 300
    assert rows[later]["mae_ms"] == rows[first]["mae_ms"]  # the same head set, chosen or read back


def test_span_profile_reads_each_true_span_in_place_and_moved(tmp_path, whisper_path):
    """benchmarks/span_profile.py on tiny.en: true word spans drop their word more in place than moved 100 ms later,
    the shape the default's head-set criterion rests on (docs/timestamps.md, "Early heads: the span contrast")."""
    import os

    from benchmarks import span_profile

    timed = os.environ.get("XL_TIMED_MANIFEST")
    if not timed or not os.path.exists(timed):
        pytest.skip("XL_TIMED_MANIFEST is not set to an existing path")
    from pathlib import Path

    lines = Path(timed).read_text().splitlines()
    rows = ["\t".join(c if i != 1 else str(Path(timed).parent / c) for i, c in enumerate(line.split("\t")))
            for line in lines[13:16]]  # fmt: skip
    small = tmp_path / "m.tsv"  # 3 utterances, 2 of whose transcripts match their words on tiny.en: a short test
    small.write_text(lines[0] + "\n" + "\n".join(rows) + "\n")
    out = tmp_path / "profile.json"
    argv = ["--models", f"tiny.en={whisper_path}", "--timed", str(small), "--shifts=-0.1,0,0.1", "--out", str(out)]
    assert span_profile.main(argv) == 0
    m = json.loads(out.read_text())["models"]["tiny.en"]
    assert m["utterances"] >= 1 and m["words"] >= 10
    early, in_place, later = (m["mean_drop_nats"][k] for k in ("-0.1", "0.0", "0.1"))
    assert in_place > later + 1.0 and in_place > early  # the decoder reads a word most at its start
