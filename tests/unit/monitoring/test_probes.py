"""ProbeSet: the probe utterances by stream position, the same whatever the world size, and exactly
the stored positions after a resume."""

import pytest
import torch

from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring.probes import ProbeSet, split_batch


def _batch(ids):
    return {"input_features": torch.arange(len(ids) * 4.0).view(len(ids), 1, 4), "id": list(ids)}


def test_shards_of_two_ranks_merge_into_the_single_process_set():
    single = ProbeSet(num_probes=3)
    single.take(split_batch(_batch("abcdef")))
    ranks = []
    for rank in (0, 1):  # a DistributedSampler without shuffling: rank r gets items r, r + 2, ...
        share = ProbeSet(num_probes=3)
        share.start_pass(stride=2, offset=rank)
        share.take(split_batch(_batch("abcdef"[rank::2])))
        ranks.append(share.items)
    merged = ProbeSet(num_probes=3)
    merged.merge(ranks)
    assert [p.id for p in merged.finalize()[0]] == [p.id for p in single.finalize()[0]] == ["a", "b", "c"]
    assert merged.positions == [0, 1, 2]


def test_a_resumed_set_takes_exactly_its_stored_positions_and_is_never_called_few():
    resumed = ProbeSet(num_probes=3)
    resumed.positions, resumed.ids = [1, 4], ["b", "e"]
    resumed.take(split_batch(_batch("abcdef")))
    items, few = resumed.finalize()
    assert [p.position for p in items] == [1, 4] and not few


def test_few_or_no_utterances_are_said():
    few = ProbeSet(num_probes=5)
    few.take(split_batch(_batch("ab")))
    assert few.finalize()[1] is True
    with pytest.raises(XAttnError, match="gave no utterance.* batch_keys=.* batch_fn="):
        ProbeSet(num_probes=2).finalize()
