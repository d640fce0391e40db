"""The benchmark scripts run end to end (tiny settings; the numbers themselves are in the README)."""

import json

import pytest


def test_perf_benchmarks_on_tiny_model(tmp_path, monkeypatch):
    from benchmarks import perf

    monkeypatch.delenv("XL_WHISPER_PATH", raising=False)
    monkeypatch.delenv("XL_ESPEAK_MANIFEST", raising=False)
    assert (
        perf.main(
            [
                "--only",
                "spes,encoder,kv,kl,batch,flops,gradients,convergence",
                "--n-masks",
                "16",
                "--convergence-ns",
                "16,32",
                "--convergence-ref",
                "64",
                "--n-steps",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "perf.json").read_text())
    assert rep["spes"]["n_masks"] == 16 and rep["spes"]["ours_s"] > 0
    for v in rep["gradients"].values():
        assert v["max_rel_diff"] < 1e-4  # batched maps are Captum's maps
    assert [r["n"] for r in rep["convergence"]["encoder_spes"]["rows"]] == [16, 32]
    assert rep["kv"]["max_abs_diff"] <= 1e-5  # the K/V shortcut's maps are the zeroed frames' maps
    assert [r["batch_size"] for r in rep["kl"]["rows"]] == [8, 32, 64]
    assert rep["batch"]["auto_batch_size"] >= 1 and rep["batch"]["max_abs_diff"] <= 1e-5  # same maps
    f = rep["flops"]
    assert 0 < f["mask_vocabulary_share"] < 1 and f["mask_gflop"] > 0 and f["encoder_gflop"] > 0
    assert f["reading_gflop"] > 4 * 256 * f["mask_gflop"]  # the masks plus the probes' fixed passes
    for r in rep["kl"]["rows"]:  # both KL formulas agree with float64
        assert r["fused_max_err_vs_float64"] < 5e-6 and r["log_softmax_max_err_vs_float64"] < 5e-6
    with pytest.raises(SystemExit):
        perf.main(["--only", "nope"])




def test_reliability_floor_choice_counts_every_reading():
    from benchmarks.reliability_floor import choose_floor

    near = [{"reliability": 0.876, "abs_diff": 0.01}, {"reliability": 0.5, "abs_diff": 0.03}]
    assert choose_floor(near, 0.05) == 0.5  # the most reliable reading's cut (0.87) no longer rounds past it
    far = near + [{"reliability": 0.2, "abs_diff": 0.4}]
    assert choose_floor(far, 0.05) == 0.5  # the cut below, 0.2, brings the mean over the tolerance




def test_control_variate_estimators_are_unbiased_and_use_a_good_surrogate():
    """Where KL is a function of the surrogate, the control variate gives the map from few masks;
    where the surrogate is useless, it stays on the paper's estimate (no bias)."""
    import torch

    from benchmarks.estimators import estimate
    from xattn_lightning.saliency.perturbation import draw_keep_masks

    t, p_h = 12, 0.7
    w = torch.rand(2, t, generator=torch.Generator().manual_seed(0)) ** 3

    def kl_of(keep):  # [N, 2]: large when the frames that matter to each token are occluded
        s = keep.double() @ (w / w.sum(-1, keepdim=True)).double().T / (1 - p_h)
        return torch.exp(-2.0 * s)

    big = draw_keep_masks(200_000, t, p_h, torch.Generator().manual_seed(1))
    truth = estimate(big, kl_of(big), "paper")
    keep = draw_keep_masks(128, t, p_h, torch.Generator().manual_seed(2))
    kl = kl_of(keep)
    paper_err = (estimate(keep, kl, "paper") - truth).abs().max()
    cv_err = (estimate(keep, kl, "cv_attention", attention=w, p_h=p_h) - truth).abs().max()
    assert cv_err < paper_err / 3
    useless = torch.rand(2, t, generator=torch.Generator().manual_seed(3))
    errs = []
    for seed in range(20):  # averaged over seeds, a useless surrogate's estimate centres on the truth
        keep = draw_keep_masks(128, t, p_h, torch.Generator().manual_seed(100 + seed))
        errs.append(estimate(keep, kl_of(keep), "cv_attention", attention=useless, p_h=p_h) - truth)
    assert torch.stack(errs).mean(0).abs().max() < 0.01
    idx = estimate(keep, kl_of(keep), "cv_index", p_h=p_h)
    assert idx.shape == truth.shape and torch.isfinite(idx).all()


def test_comparison_goals_count_spreads_signs_and_coverage():
    """benchmarks/comparison.py's goal table, on two synthetic seeds of one pair."""
    from benchmarks.comparison import goals

    def side(v, lo, hi):
        return {"pearson_corrected": v, "pearson_corrected_ci_low": lo, "pearson_corrected_ci_high": hi}

    ref = {"base": 0.44, "other": 0.47, "diff": {"value": 0.03, "ci_low": 0.01, "ci_high": 0.05, "comparable": True}}
    seeds = [
        {"base": side(0.45, 0.40, 0.50), "other": side(0.49, 0.45, 0.53),
         "diff": {"value": 0.04, "ci_low": 0.00, "ci_high": 0.08}, "raw_diff_at_256_unchecked": -0.01},
        {"base": side(0.43, 0.38, 0.48), "other": side(0.46, 0.41, 0.51),
         "diff": {"value": 0.03, "ci_low": -0.01, "ci_high": 0.02}, "raw_diff_at_256_unchecked": 0.01},
    ]  # fmt: skip
    g = goals([{"other": "tuned", "reference": ref, "seeds": seeds}])
    assert g["headline_for_every_checkpoint"] is True
    assert g["checkpoint_seed_spread"]["tuned"] == pytest.approx(0.03) and g["checkpoint_seed_spread"][
        "base"
    ] == pytest.approx(0.02)
    assert g["difference_seed_spread"]["tuned"] == pytest.approx(0.01)
    assert g["sign_right"] == "2/2" and g["sign_agrees_old_default"] == "1/2"
    assert g["intervals_holding_reference"] == pytest.approx(5 / 6)  # the second difference's interval misses 0.03


def test_tolerance_table_reproduces_the_recorded_choices_and_moves_with_the_tolerance():
    from pathlib import Path

    from benchmarks.timestamps_models import tolerance_pick, tolerance_table
    from xattn_lightning.timestamps import CHOICE_TOLERANCE_SE

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for name in ("timestamps_models_cpu", "timestamps_models_blind_f4_cpu", "timestamps_models_blind_gbclan_m2_cpu"):
        report = json.loads((results / f"{name}.json").read_text())
        for model in report["models"].values():  # the package's rule at its tolerance, from the recorded criterion
            assert tolerance_pick(model, CHOICE_TOLERANCE_SE) == model["chosen"]
    sets = {"all": [[0, 0], [0, 1], [1, 0], [1, 1]], "upper_half": [[1, 0], [1, 1]], "consistent": [[0, 0], [1, 1]]}
    model = {
        "candidates": sets,
        "ensembles": {"all+consistent": ["all", "consistent"]},
        "criterion": {"all": 0.1, "upper_half": -0.3, "consistent": 0.0, "all+consistent": 0.05},
        "criterion_standard_errors": {"all": 0.2, "upper_half": 0.0, "consistent": 0.1, "all+consistent": 0.1},
        "default_ms": {"all": 50.0, "upper_half": 40.0, "model": 90.0, "consistent": 45.0, "all+consistent": 48.0},
    }
    assert tolerance_pick(model, 0.0) == "upper_half"  # the lowest criterion
    assert tolerance_pick(model, 2.0) == "all"  # 0.4 <= 2 x 0.2, and the ensemble (3.5 SE) is out
    assert tolerance_pick(model, 4.0) == "all+consistent"  # the most heads (6) within 4 SE
    assert tolerance_pick(model, float("inf")) == "all+consistent"
    drops = {**model, "criterion": {n: -v for n, v in model["criterion"].items()}, "criterion_higher_is_better": True}
    assert [tolerance_pick(drops, t) for t in (0.0, 2.0, 4.0)] == ["upper_half", "all", "all+consistent"]  # span drops
    table = tolerance_table({"speech": {"models": {"m": model}}}, (0.0, 4.0))
    assert "| 0 | 1 of 1; 40.0 ms (+0.0) |" in table and "| 4 | 0 of 1; 48.0 ms (+8.0) |" in table


def test_the_large_model_gpu_benchmark_runs_on_a_tiny_shape_on_cpu(tmp_path):
    from benchmarks import gpu_large

    argv = ["--device", "cpu", "--shape", "tiny", "--train-seconds", "0.5", "--probes", "2", "--probe-seconds", "1",
            "--tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    assert gpu_large.main(argv) == 0
    rep = json.loads((tmp_path / "gpu_large.json").read_text())
    assert rep["training"]["steps"] >= 1 and rep["reading"]["calibration_s"] > 0
    reading = rep["reading"]
    assert reading["n_masks_chosen"] in (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert (reading["continuation_s"] > 0) == (reading["n_masks_chosen"] != 256)
    assert rep["reading_share_of_training"] == reading["reading_s"] / rep["training"]["seconds"]
