"""``xattn_lightning.timestamps.heads``: heads ranked by agreement with saliency, or by their error with labels."""

import pytest
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.functional.alignment import (
    select_heads_by_agreement,
)


def test_alignment_heads_label_free_ranks_by_agreement_and_applies():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 40))
    heads = xl.alignment_heads(m, [b], n_masks=16, k=2, apply=True)
    assert len(heads) == 2 and all(len(h) == 2 for h in heads)
    assert m.generation_config.alignment_heads == heads
    grid = xl.timestamps.head_agreement(m, [b], n_masks=16)
    assert [list(h) for h in heads] == select_heads_by_agreement(grid, 2)


def test_supervised_needs_words():
    m = speaking_tiny_whisper()
    with pytest.raises(xl.XAttnError, match="words"):
        xl.alignment_heads(m, [whisper_batch(m, lengths=(60,))], supervised=True)


# --- real Whisper tiny.en ---------------------------------------------------------------------------
