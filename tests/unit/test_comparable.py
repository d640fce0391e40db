"""Readings you can act on: ``n_masks="auto"`` (a mask count chosen once so that every reading and
checkpoint gets a corrected headline, then frozen), differences between checkpoints and since the
first reading with their own paired intervals, and numbers that are not comparable said so."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from helpers import noise_manifest, speaking_tiny_whisper, tiny_extractor
from test_scripts import FakeTokenizer, TrainOnly, fit, tuple_data
from torch.utils.data import DataLoader

import xattn_lightning as xl
import xattn_lightning.reading as reading_module
from xattn_lightning.audio import read_manifest
from xattn_lightning.compare import compare_checkpoints
from xattn_lightning.compare_report import CheckpointResult, Comparison, write_comparison
from xattn_lightning.functional import MASK_LADDER, choose_n_masks
from xattn_lightning.summary import paired_differences


def _spy_explain(monkeypatch, module, resumed: list | None = None) -> list[tuple[int, float]]:
    """Record (n_masks, encoder_spes reliability) of every explanation ``module`` makes (and in ``resumed``,
    the masks each continued from, 0 for none)."""
    calls: list[tuple[int, float]] = []
    real = module.explain

    def spy(*args, **kwargs):
        exps = real(*args, **kwargs)
        masks = kwargs["options"].n_masks if kwargs.get("options") is not None else kwargs.get("n_masks")
        calls.extend((masks, e.reliability("encoder_spes")) for e in exps)
        if resumed is not None:
            before = kwargs.get("resume") or [None] * len(exps)
            resumed.extend(b.results["encoder_spes"].n_masks if b is not None else 0 for b in before)
        return exps

    monkeypatch.setattr(module, "explain", spy)
    return calls


def test_auto_masks_measure_once_choose_the_rung_and_freeze_it(tmp_path, monkeypatch):
    from xattn_lightning.saliency.vocabulary import has_bf16_units

    resumed: list[int] = []
    calls = _spy_explain(monkeypatch, reading_module, resumed)
    probes = DataLoader(tuple_data(2, seed=1), batch_size=2)
    mon = xl.XAttnSaliencyMonitor(
        max_overhead=None, num_probes=2, probes=probes, targets="labels", tokenizer=FakeTokenizer()
    )  # n_masks is "auto" by default
    said: list[str] = []
    mon.instrument.messages.say = said.append
    assert mon.config.reading.saliency.n_masks == "auto"
    fit(tmp_path, TrainOnly(), mon, max_epochs=3)
    n = mon.instrument.reader.masks.frozen
    first = [rel for masks, rel in calls[:2]]
    assert [masks for masks, _ in calls[:2]] == [MASK_LADDER[0]] * 2  # measured at the first rung
    assert n == choose_n_masks(MASK_LADDER[0], sum(first) / 2 if not any(map(math.isnan, first)) else math.nan)
    rest = calls[2:]
    assert [masks for masks, _ in rest] == [n] * 6  # then every reading at n: 3 readings x 2 probes
    assert len(mon.history) == 3 and all(h["xattn/encoder_spes/n_masks"] == n for h in mon.history)
    assert mon.state_dict()["n_masks_frozen"] == n  # a resume keeps it
    assert n != MASK_LADDER[0]  # (these maps need more than the first rung)
    assert resumed == [0, 0, MASK_LADDER[0], MASK_LADDER[0], 0, 0, 0, 0]  # the first reading continued its masks
    plan = [s for s in said if "a reading will take about" in s]
    assert len(plan) == 1 and f"{n} masks x" in plan[0] and "max_overhead=None" in plan[0]  # said once
    assert ("bfloat16" in plan[0]) is has_bf16_units("cpu")  # the default vocabulary term, said where it is taken
    assert said.index(plan[0]) < next(i for i, s in enumerate(said) if "reading at step" in s)  # before the masks
    assert "took 3 reading(s)" in said[-1] and "none thinned" in said[-1]  # the run's end


def test_a_continued_first_reading_logs_what_a_reading_at_the_chosen_count_logs(tmp_path):
    def first_reading(n_masks):
        mon = xl.XAttnSaliencyMonitor(
            max_overhead=None, num_probes=2, probes=tuple_data(2, seed=1), targets="labels", n_masks=n_masks
        )
        fit(tmp_path, TrainOnly(), mon, max_epochs=1)
        return mon

    auto = first_reading("auto")
    n = auto.instrument.reader.masks.frozen
    assert n != MASK_LADDER[0]  # (this data's maps need more than the first rung)
    fixed = first_reading(n)
    for key, value in fixed.history[0].items():
        if key.startswith("xattn/encoder_spes/") and "ci_" not in key:
            assert auto.history[0][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_auto_masks_in_the_checkpoint_survive_a_resume_without_measuring_again(tmp_path, monkeypatch):
    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, probes=tuple_data(2), targets="labels")
    from helpers import scored

    mon.load_state_dict({"n_masks_frozen": 512, "baseline": [scored(0.1, pid="probe0").to_dict()]})
    calls = _spy_explain(monkeypatch, reading_module)
    fit(tmp_path, TrainOnly(), mon, max_epochs=1)
    assert [masks for masks, _ in calls] == [512, 512] and mon.instrument.reader.masks.frozen == 512
    # a baseline in a form this version does not read (an older checkpoint's flat rows): the rest of the state
    # is kept, and the next reading becomes the baseline
    old = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=2, probes=tuple_data(2), targets="labels")
    old.load_state_dict({"n_masks_frozen": 512, "baseline": [{"id": "probe0", "encoder_spes/pearson": 0.1}]})
    assert old.instrument.reader.masks.frozen == 512 and old.instrument.publisher.history.baseline == []


def test_explain_asks_for_a_number_instead_of_auto():
    from helpers import whisper_batch

    model = speaking_tiny_whisper()
    with pytest.raises(xl.XAttnError, match="n_masks='auto' is chosen .* n_masks=512"):
        xl.explain(model, whisper_batch(model, lengths=(60,)), n_masks="auto")
    with pytest.raises(xl.XAttnError, match="positive int or 'auto'"):
        xl.XAttnSaliencyMonitor(n_masks=0)


def test_the_monitor_logs_the_change_since_its_first_reading_with_an_interval(tmp_path):
    from helpers import fit_demo

    mon = xl.XAttnSaliencyMonitor(max_overhead=None, num_probes=3, methods=("encoder_spes",), targets="labels")
    fit_demo(tmp_path, mon, max_epochs=3)  # the demo's maps are reliable at 256 masks
    first, *later = mon.history
    key = "xattn/encoder_spes/pearson_corrected_delta"
    assert key not in first and len(later) == 2
    for h in later:
        # paired over the same probes: the change of the mean equals the mean of the changes
        assert h[key] == pytest.approx(
            h["xattn/encoder_spes/pearson_corrected"] - first["xattn/encoder_spes/pearson_corrected"]
        )
        assert h[f"{key}_ci_low"] <= h[key] <= h[f"{key}_ci_high"]
    assert mon.state_dict()["baseline"] and mon.state_dict()["baseline"][0]["id"] == mon.probe_ids[0]


# ---------------------------------------------------------------- compare
def _rows(rel: float, rho: float, noise: float = 0.02, n: int = 6, shift: float = 0.0) -> list:
    from helpers import scored

    g = torch.Generator().manual_seed(int(rel * 1000))
    out = []
    for i in range(n):
        r = rho + shift + 0.05 * float(torch.randn(1, generator=g))
        out.append(scored(r, reliability=rel, noise=noise, n_masks=256, pid=f"p{i}", position=i, layers=[0.1], grid=[[0.1]]))
    return out


def _result(name: str, rows: list) -> CheckpointResult:
    from xattn_lightning.summary import summarize

    return CheckpointResult(name, summarize(rows, ("encoder_spes",)), math.nan, 0.0)


def test_raw_rho_of_unequally_reliable_maps_is_not_printed_side_by_side():
    """The case that ranked two models the wrong way round: the raw ρ of the noisier maps is more
    attenuated. The table says so instead of printing it, and gives the corrected difference."""
    base = _result("base", _rows(0.34, 0.25))
    tuned = _result("tuned", _rows(0.24, 0.24))  # raw lower, corrected higher
    comp = Comparison(("encoder_spes",), ("pearson", "spearman"), [f"p{i}" for i in range(6)], [base, tuned], 256)
    table = comp.table()
    assert [line.split()[1:4] for line in table.splitlines() if line.startswith("encoder_spes/pearson ")] == [
        ["not", "comparable:", "maps"]
    ]
    assert "maps of unequal reliability (0.34, 0.24): read pearson_corrected" in table
    for key in ("encoder_spes/pearson_ci_low", "encoder_spes/pearson_ci_high"):  # nor the raw ρ's interval
        assert [line.split()[1] for line in table.splitlines() if line.startswith(key + " ")] == ["not"]
    assert "encoder_spes/pearson_corrected" in table and "<floor (0.24)" in table  # tuned is below the 0.3 floor
    d = comp.differences()["tuned"]
    assert not d["encoder_spes/pearson_corrected"].comparable and "floor" in d["encoder_spes/pearson_corrected"].reason
    assert not d["encoder_spes/pearson"].comparable
    assert "tuned: encoder_spes/pearson_corrected  not comparable" in table


def test_a_paired_difference_has_its_own_interval_and_the_right_sign():
    base = _result("base", _rows(0.6, 0.30))
    better = _result("better", _rows(0.6, 0.30, shift=0.08))  # the same probes, every one 0.08 higher
    comp = Comparison(("encoder_spes",), ("pearson",), [f"p{i}" for i in range(6)], [base, better], 1024)
    d = comp.differences()["better"]["encoder_spes/pearson_corrected"]
    assert d.comparable and d.value == pytest.approx(0.08 / 0.6**0.5)
    assert 0 < d.ci_low < d.value < d.ci_high  # paired: the probes' own spread cancels
    unpaired = paired_differences(base.summary.probes, list(reversed(better.summary.probes)), "encoder_spes")["pearson_corrected"]
    assert unpaired.value == pytest.approx(d.value)  # paired by id, not by position
    assert "better: encoder_spes/pearson_corrected  +0.103 [" in comp.table()


def test_compare_auto_reads_every_checkpoint_with_the_count_the_least_reliable_needs(tmp_path, monkeypatch, caplog):
    resumed: list[int] = []
    calls = _spy_explain(monkeypatch, reading_module, resumed)
    rows = read_manifest(noise_manifest(tmp_path, n=2))
    with caplog.at_level(logging.INFO):
        comp = compare_checkpoints(
            [speaking_tiny_whisper(0), speaking_tiny_whisper(1)], rows, processor=tiny_extractor(),
            names=["a", "b"], progress=False, batch_size=2,
        )  # fmt: skip
    # the rest of the cost is said once, after the calibration and before its masks run
    said = [r.getMessage() for r in caplog.records if "n_masks='auto'" in r.getMessage()]
    assert len(said) == 1
    more = re.search(r"the (\d+) more will take about \d+ s", said[0])
    assert more and int(more.group(1)) == comp.n_masks - MASK_LADDER[0]
    n = comp.n_masks
    measured = {name: by_m["encoder_spes"] for name, by_m in comp.calibration.items()}
    assert set(measured) == {"a", "b"} and [m for m, _ in calls[:4]] == [MASK_LADDER[0]] * 4
    assert n == max(choose_n_masks(MASK_LADDER[0], rel) for rel in measured.values())
    for r in comp.results:  # the same count for every checkpoint
        assert r.summary.scalars["encoder_spes/n_masks"] == n and not r.resume
    assert n != MASK_LADDER[0]  # (these maps need more than the first rung)
    assert resumed == [0] * 4 + [MASK_LADDER[0]] * 4
    data = write_comparison(comp, tmp_path / "out")["json"].read_text()
    assert '"n_masks": ' + str(n) in data and '"differences"' in data
    assert "masks per map" in comp.table() and "change from a" in comp.table()
