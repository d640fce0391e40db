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
