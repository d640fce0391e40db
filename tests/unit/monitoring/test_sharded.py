"""The monitor under sharded strategies (FSDP, FSDP2) on 2 CPU processes: the readings DDP gives, training
bit-identical with and without it, no hang when a rank is late or faulty, ``max_gathered_gb`` said once;
``compare`` reading sharded checkpoint directories; the bounded exchanges and the unsharded copy alone."""

from __future__ import annotations

import shutil
from datetime import timedelta

import pytest
import torch
from helpers import HANG, logged_numbers, max_difference, run_two_processes
from torch import nn

from xattn_lightning.checkpoints import consolidate_sharded_checkpoint
from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring.sharded import BoundedExchange, ReadingFailed, full_bytes, plain_copy

CASES = ["ddp-with", "fsdp2-with", "fsdp2-without", "fsdp-with", "fsdp-without", "fsdp2-delay", "fsdp2-raise",
         "fsdp2-small", "fsdp2-lockstep"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-process run of every case (tests/sharded_run.py); the checkpoints' folder, rank 0's and rank 1's results."""
    out = tmp_path_factory.mktemp("sharded")
    env = {"SHARDED_RUN_CKPT_DIR": str(out), "SHARDED_RUN_DUMP_AFTER": str(HANG - 30)}
    return (out, *run_two_processes("sharded_run.py", out, CASES, env))


@pytest.mark.timeout(HANG + 60)
@pytest.mark.parametrize("case", ["fsdp2-with", "fsdp-with", "fsdp2-lockstep"])
def test_sharded_readings_equal_ddp_and_training_is_unchanged(run, case):
    """FSDP2 (ModelParallelStrategy + fully_shard) and FSDP (an FSDPStrategy subclass): 3 probes of different
    lengths over 2 ranks (2 and 1, different generated lengths, every forward of the sharded model a
    collective); the readings are DDP's, on both ranks, and the weights those of the same fit without it.
    ``fsdp2-lockstep``: lockstep=True on the unsharded copy (every rank reads all 3 probes), the same numbers."""
    _, r0, r1 = run
    ddp = r0["ddp-with"]["history"]
    assert [e["epoch"] for e in ddp] == [0, 1] and all(e["xattn/num_probes"] == 3.0 for e in ddp)
    assert max_difference(r0[case]["history"], ddp) < 1e-5
    assert max_difference(r1[case]["history"], ddp) < 1e-5
    assert r0[case]["same_weights"] is True and r1[case]["same_weights"] is True
    assert r0[case]["gather_cost"]["gathered_gb"] * 2**30 == 48576  # the tiny Whisper's 12,144 float32 parameters
    assert not [w for w in r0[case]["warnings"] if "failed" in w], r0[case]["warnings"]
    if case == "fsdp2-lockstep":  # each rank explained all 3 probes at both readings
        assert r0[case]["generated"] == r1[case]["generated"] == 6


@pytest.mark.timeout(HANG + 60)
def test_a_late_rank_fails_the_reading_on_every_rank_together_and_training_goes_on(run):
    """Rank 1 late past reading_timeout at the first reading: that reading fails on both ranks, warned once;
    the second reading is the undisturbed run's; training is unchanged."""
    _, r0, r1 = run
    for r in (r0, r1):
        assert [e["epoch"] for e in r["fsdp2-delay"]["history"]] == [1]
        assert max_difference(r["fsdp2-delay"]["history"], r["fsdp2-with"]["history"][1:]) < 1e-6
        assert r["fsdp2-delay"]["same_weights"] is True
    said = [w for w in r0["fsdp2-delay"]["warnings"] if "failed on every process together" in w]
    assert len(said) == 1 and "process [1] did not reach" in said[0], r0["fsdp2-delay"]["warnings"]


@pytest.mark.timeout(HANG + 60)
def test_a_fault_on_one_rank_costs_its_probe_only(run):
    """Rank 1's probe raises at the first reading: both ranks log the same reading of the other two probes."""
    _, r0, r1 = run
    first = r0["fsdp2-raise"]["history"][0]
    assert (first["epoch"], first["xattn/num_probes"], first["xattn/num_failed"]) == (0, 2.0, 1.0)
    assert [logged_numbers(e) for e in r0["fsdp2-raise"]["history"]] == [logged_numbers(e) for e in r1["fsdp2-raise"]["history"]]
    assert r0["fsdp2-raise"]["same_weights"] is True


@pytest.mark.timeout(HANG + 60)
def test_a_copy_over_max_gathered_gb_is_skipped_on_every_rank_and_said_once(run):
    _, r0, r1 = run
    assert r0["fsdp2-small"]["history"] == r1["fsdp2-small"]["history"] == []
    said = [w for w in r0["fsdp2-small"]["warnings"] if "max_gathered_gb=1e-06" in w]
    assert len(said) == 1 and "0.00 GiB" in said[0], r0["fsdp2-small"]["warnings"]
    assert r0["fsdp2-small"]["same_weights"] is True


@pytest.mark.timeout(HANG + 60)
@pytest.mark.parametrize("case", ["fsdp2-with", "fsdp-with"])
def test_compare_loads_a_sharded_checkpoint_directory(run, case, tmp_path):
    """Lightning's distributed-checkpoint directory (ModelParallelStrategy; FSDPStrategy with
    state_dict_type="sharded"), consolidated by torch's dcp_to_torch_save: the trained weights; a missing
    shard is named."""
    from xattn_lightning.checkpoints import load_checkpoint

    out, _, _ = run
    module, _, name = load_checkpoint(str(out / f"{case}.ckpt"), module="sharded_run:Module")  # (tests/ is on the path)
    trained = torch.load(out / f"{case}.weights.pt")
    state = module.state_dict()
    assert name == case and trained.keys() <= state.keys()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(out / f"{case}.ckpt", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(XAttnError, match=r"misses 1 of its 2 shards \(__1_0.distcp\)"):
        consolidate_sharded_checkpoint(broken, tmp_path / "whole.ckpt")


def test_a_deepspeed_directory_without_deepspeed_says_what_it_needs(tmp_path):
    pytest.importorskip("lightning")
    if importlib_util_find("deepspeed"):
        pytest.skip("deepspeed is installed: the directory here is not a real DeepSpeed checkpoint")
    (tmp_path / "latest").write_text("global_step8")
    with pytest.raises(XAttnError, match="DeepSpeed checkpoint; consolidating it needs deepspeed"):
        consolidate_sharded_checkpoint(tmp_path, tmp_path / "whole.ckpt")


def importlib_util_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- the pieces alone (one process)
def _exchanges(timeout: float = 30.0, reading: int = 0) -> tuple[BoundedExchange, BoundedExchange]:
    """Two processes' exchanges, each with its own client of one store (as two processes would have)."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, 3, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    clients = [
        torch.distributed.TCPStore("127.0.0.1", server.port, 3, False, timeout=timedelta(seconds=60)) for _ in "ab"
    ]
    _SERVERS.append(server)  # the server lives as long as the test module
    return BoundedExchange(clients[0], 2, 0, timeout, reading), BoundedExchange(clients[1], 2, 1, timeout, reading)


_SERVERS: list = []


def _both(fn0, fn1) -> list:
    from helpers import side_by_side

    return side_by_side([fn0, fn1], timeout=60)


@pytest.mark.timeout(120)
def test_bounded_exchanges_agree_or_fail_together():
    a, b = _exchanges()
    assert _both(lambda: a.exchange("x", "t"), lambda: b.exchange("y", "t")) == [["x", "y"], ["x", "y"]]
    assert _both(lambda: a.exchange(1, "t"), lambda: b.exchange(2, "t")) == [[1, 2], [1, 2]]
    # processes at different steps of a reading: both fail, neither takes the other's object
    outs = _both(lambda: a.exchange("rows", "Instrument._gather"), lambda: b.exchange("n", "Instrument._options"))
    assert all(isinstance(o, ReadingFailed) and "different steps" in str(o) for o in outs), outs
    # a failed reading fails every later exchange at once
    assert isinstance(_both(lambda: a.exchange(1, "t"), lambda: None)[0], ReadingFailed)


@pytest.mark.timeout(120)
def test_a_process_that_fails_releases_the_other_at_once_and_a_late_one_fails_too():
    a, b = _exchanges(reading=1)
    outs = _both(lambda: a.exchange("x", "t"), lambda: b.fail("rank 1 cannot read"))
    assert isinstance(outs[0], ReadingFailed) and "rank 1 cannot read" in str(outs[0])
    # past the bound: the one waiting fails; the late one, arriving after, fails too (the first verdict holds)
    a, b = _exchanges(timeout=0.2, reading=2)
    assert isinstance(_both(lambda: a.exchange("x", "t"), lambda: None)[0], ReadingFailed)
    late = _both(lambda: None, lambda: b.exchange("y", "t"))[1]
    assert isinstance(late, ReadingFailed) and "process [1] did not reach" in str(late)


def test_the_unsharded_copy_has_the_weights_and_no_hooks_and_shares_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    model.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("a collective")))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin, twins = plain_copy(model, state)
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
        assert torch.equal(twin(x), expected)
    assert twin[2].bias is None and twins[id(model[0])] is twin[0]
    assert all(not p.requires_grad for p in twin.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(twin.parameters(), model.parameters()))
    assert full_bytes(model) == (3 * 4 + 4 + 4 * 2) * 4
    with pytest.raises(XAttnError, match="miss 1"):
        plain_copy(model, {k: v for k, v in state.items() if k != "2.weight"})


@pytest.mark.timeout(120)
def test_a_host_tags_each_exchange_with_its_caller():
    """Through the host, the exchange carries the name of the function that called it: two processes at
    different steps of a reading (one gathering rows, one choosing the mask count) fail together."""
    from xattn_lightning.monitoring.core import SingleProcess
    from xattn_lightning.monitoring.sharded import ShardedHost

    a, b = _exchanges(reading=3)

    class Proc(SingleProcess):
        world_size = 2

    ha, hb = ShardedHost(Proc(), a), ShardedHost(Proc(), b)

    def _gather():
        return ha.all_gather("rows")

    def _options():
        return hb.all_gather(8)

    outs = _both(_gather, _options)
    assert all(isinstance(o, ReadingFailed) for o in outs), outs
    assert "_gather" in str(outs[0]) and "_options" in str(outs[0])


@pytest.mark.timeout(120)
def test_a_fault_whose_post_another_process_saw_first_is_still_the_verdict_on_both():
    """The race in ``fail``: process 1 posts its fault, process 0 sees every post and proposes "ok" before process
    1 proposes "fail". Both still fail with process 1's cause (process 0 from the posts, process 1 likewise)."""
    a, b = _exchanges(reading=4)
    b._post(("fail", "rank 1 cannot read", None))  # the first half of b.fail(): its post, not yet its proposal
    with pytest.raises(ReadingFailed, match="rank 1 cannot read"):
        a.exchange("x", "t")  # all posts there: a proposes "ok" and wins, then reads the fault among the posts
    assert b.fail("rank 1 cannot read") == "rank 1 cannot read" and b.failed == "rank 1 cannot read"
