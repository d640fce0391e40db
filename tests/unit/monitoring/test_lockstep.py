"""Lockstep readings of a model whose own forward all-reduces: on 2 CPU processes (gloo, DDP), every rank reads
every probe (3, of different lengths) and the readings are one process's; ``lockstep="auto"`` finds the all-reduce
and leaves a model without collectives split; a fault on one rank in the middle of a probe skips that probe on
every rank; a rank late past ``reading_timeout`` fails the reading on every rank, warned once; training is bit
for bit the same as without the monitor. In one process (two threads, a barrier for the collective): processes
about to run different forwards fail that probe together, before the collective."""

from __future__ import annotations

import threading
from datetime import timedelta
from functools import partial

import pytest
import torch
from helpers import HANG, logged_numbers, max_difference, run_two_processes
from lockstep_run import LENGTHS, collective_s2t, probes, set_collectives

from xattn_lightning.monitoring.lockstep import active, first_collective, lockstep_reading, read, share_of
from xattn_lightning.reading import Probe, ReadingConfig
from xattn_lightning.reading import read as read_one_process
from xattn_lightning.saliency import SaliencyOptions
from xattn_lightning.testing import TinyS2T

CASES = ["without", "true", "auto", "raise", "delay", "plain"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-process run of every case (tests/lockstep_run.py); rank 0's and rank 1's results."""
    return run_two_processes("lockstep_run.py", tmp_path_factory.mktemp("lockstep"), CASES,
                             {"LOCKSTEP_RUN_DUMP_AFTER": str(HANG - 30)})  # fmt: skip


@pytest.mark.timeout(HANG + 60)
@pytest.mark.parametrize("case", ["true", "auto"])
def test_lockstep_readings_are_one_process_readings_and_training_is_unchanged(run, case):
    """Every rank explains all 3 probes at each reading (split, they would run different forwards and meet in
    mismatched all-reduces); both ranks log what one process reads from the same weights."""
    r0, r1 = run
    for r in (r0, r1):
        assert r[case]["generated"] == {"0": 3, "1": 3}
        assert [e["epoch"] for e in r[case]["history"]] == [0, 1]
        assert all(e["xattn/num_probes"] == 3.0 and e["xattn/num_failed"] == 0.0 for e in r[case]["history"])
        assert max_difference(r[case]["history"], r0[case]["reference"]) < 1e-6
        assert r[case]["same_weights"] is True
    assert [w for w in r0[case]["warnings"] if "tokenizer" not in w] == []


@pytest.mark.timeout(HANG + 60)
def test_auto_leaves_a_model_without_collectives_split_across_ranks(run):
    r0, r1 = run
    assert r0["plain"]["generated"] == {"0": 2, "1": 2} and r1["plain"]["generated"] == {"0": 1, "1": 1}
    assert [e["xattn/num_probes"] for e in r0["plain"]["history"]] == [3.0, 3.0]


@pytest.mark.timeout(HANG + 60)
def test_a_fault_on_one_rank_in_the_middle_of_a_probe_skips_that_probe_on_every_rank(run):
    """Rank 1 raises between two forwards of its second probe at the first reading: both ranks skip that probe,
    log the same reading of the other two, warn once, and read normally afterwards."""
    r0, r1 = run
    first = [r["raise"]["history"][0] for r in (r0, r1)]
    assert [(e["epoch"], e["xattn/num_probes"], e["xattn/num_failed"]) for e in first] == [(0, 2.0, 1.0)] * 2
    assert logged_numbers(first[0]) == logged_numbers(first[1])
    assert max_difference(r0["raise"]["history"][1:], r0["true"]["history"][1:]) < 1e-6
    said = [w for w in r0["raise"]["warnings"] if "fault injected" in w]
    assert len(said) == 1 and "probe1" in said[0] and "process 1" in said[0], r0["raise"]["warnings"]
    assert r0["raise"]["same_weights"] is True and r1["raise"]["same_weights"] is True


@pytest.mark.timeout(HANG + 60)
def test_a_late_rank_fails_the_reading_on_every_rank_together_and_training_goes_on(run):
    """Rank 1 stalls past reading_timeout in the middle of a probe: the first reading fails on both ranks, warned
    once; the second is the undisturbed run's; training is unchanged."""
    r0, r1 = run
    for r in (r0, r1):
        assert [e["epoch"] for e in r["delay"]["history"]] == [1]
        undisturbed = [{k: v for k, v in e.items() if "_delta" not in k} for e in r0["true"]["history"][1:]]
        assert max_difference(r["delay"]["history"], undisturbed) < 1e-6  # (no change since a first reading)
        assert r["delay"]["same_weights"] is True
    said = [w for w in r0["delay"]["warnings"] if "did not reach this step" in w]
    assert len(said) == 1 and "process [1]" in said[0], r0["delay"]["warnings"]


# ---------------------------------------------------------------- one process, two threads as ranks
class _Rank:
    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank = rank


def _stores(n: int = 2) -> list:
    server = torch.distributed.TCPStore(
        "127.0.0.1", 0, n + 1, True, timeout=timedelta(seconds=60), wait_for_workers=False
    )
    _SERVERS.append(server)
    return [
        torch.distributed.TCPStore("127.0.0.1", server.port, n + 1, False, timeout=timedelta(seconds=60))
        for _ in range(n)
    ]


_SERVERS: list = []


def _as_ranks(fn) -> list:
    from helpers import side_by_side

    return side_by_side([lambda: fn(0), lambda: fn(1)], timeout=120)


@pytest.mark.timeout(180)
def test_ranks_about_to_run_different_forwards_fail_that_probe_together_before_the_collective():
    """Rank 1's second probe is longer than rank 0's: at its first forward the two ranks would all-reduce tensors of
    different shapes. Both fail that probe, before the collective (a barrier that no rank breaks), and read the
    other two exactly as one process does."""
    barrier = threading.Barrier(2, timeout=30)

    def collective(x: torch.Tensor) -> torch.Tensor:
        barrier.wait()
        return x * 2

    batches = probes()
    config = ReadingConfig(targets="generate", max_new_tokens=6, saliency=SaliencyOptions.from_flat(n_masks=8))
    stores = _stores()
    models = [collective_s2t(collective) for _ in range(2)]  # (seeded: made here, not in the threads)

    def rank(r: int):
        model = models[r]
        mine = [dict(b) for b in batches]
        if r == 1:
            mine[1] = {"input_features": torch.randn(1, LENGTHS[1] + 8, 8)}
        items = [Probe.from_batch(i, b, f"probe{i}") for i, b in enumerate(mine)]
        adapter = TinyS2T.adapter(model)
        with lockstep_reading(True, stores[r], 2, r, 30.0, "divergent") as state:
            assert active() is state
            shared = share_of(items, _Rank(r), lambda: adapter)
            got = read(partial(read_one_process, adapter, config=config), adapter.model, shared)
            return [p.id for p in shared], sorted(state.explanations), got

    outs = _as_ranks(rank)
    assert not barrier.broken and all(isinstance(o, tuple) for o in outs), outs
    (share0, read0, got0), (share1, read1, got1) = outs
    assert (share0, share1) == (["probe0", "probe2"], ["probe1"])  # the rows each gathers to the other
    assert read0 == read1 == ["probe0", "probe2"]  # each rank read every probe, and both failed probe1
    assert got0.failures == [] and [f.id for f in got1.failures] == ["probe1"]
    assert "different forwards" in got1.failures[0].cause and "torch.Size" not in got1.failures[0].cause
    model = collective_s2t()
    set_collectives(model, False)
    alone = read_one_process(
        TinyS2T.adapter(model), [Probe.from_batch(i, b, f"probe{i}") for i, b in enumerate(batches)], config
    )
    expected = [r.scores for r in alone.results if r.scores.id != "probe1"]
    assert repr([r.scores for r in got0.results]) == repr(expected)  # (repr: NaN equal to NaN)
    assert got1.results == []
    assert all(not m._forward_pre_hooks and not m._forward_hooks for x in models for m in x.modules())  # none left


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_resolve_its_model_releases_the_lockstep_ranks_at_once():
    """Rank 1's model_fn raises before the reading begins: rank 0, reading in lockstep, fails the reading at its
    first step at once instead of waiting reading_timeout for rank 1."""
    import time

    from xattn_lightning.monitoring.exchange import ReadingFailed

    stores = _stores()
    adapter = TinyS2T.adapter(collective_s2t(lambda x: x * 2))
    items = [Probe.from_batch(i, b, f"probe{i}") for i, b in enumerate(probes())]
    config = ReadingConfig(targets="generate", max_new_tokens=6, saliency=SaliencyOptions.from_flat(n_masks=8))

    def resolve_on(r: int):
        if r == 1:
            raise RuntimeError("no model on rank 1")
        return adapter

    def rank(r: int):
        t0 = time.perf_counter()
        with lockstep_reading(True, stores[r], 2, r, 60.0, "left"):
            mine = share_of(items, _Rank(r), lambda: resolve_on(r))
            if r == 0:
                try:
                    read(partial(read_one_process, adapter, config=config), adapter.model, mine)
                except ReadingFailed as err:
                    return str(err), time.perf_counter() - t0
            return mine

    outs = _as_ranks(rank)
    (why, seconds), mine1 = outs
    assert "process 1 left the reading before it began (RuntimeError: no model on rank 1)" in why
    assert seconds < 30 and [p.id for p in mine1] == ["probe1"]


def test_outside_a_lockstep_reading_each_process_reads_its_share():
    assert active() is None
    assert share_of([0, 1, 2], _Rank(1), lambda: None) == [1]
    with lockstep_reading(False, object(), 2, 1, 1.0, "off") as state:
        assert state is None and active() is None and share_of([0, 1, 2], _Rank(1), lambda: None) == [1]


def test_the_auto_check_stops_at_the_first_collective_without_running_it():
    """``lockstep="auto"`` decides on each process alone: the check forward stops at its first collective, before
    running it, so a process never waits there for others that are not checking (a rank that failed earlier)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ran: list[int] = []

        def reduce(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x)
            ran.append(1)
            return x

        model = collective_s2t(reduce, world=1)
        adapter = TinyS2T.adapter(model)
        assert first_collective(adapter, probes()[0]) == ["c10d.allreduce_.default"] and ran == []
        set_collectives(model, False)
        assert first_collective(adapter, probes()[0]) == []
    finally:
        dist.destroy_process_group()
