"""``xattn_lightning.timestamps.align``: the timing of an alignment and its options."""

import pytest
from helpers import speaking_tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.timestamps import TimingOptions, alignment_from, alignment_token_times


def test_timing_options_are_checked_when_made():
    with pytest.raises(xl.XAttnError, match="fusion"):
        TimingOptions(method="transformers", fusion=0.2)
    for bad, match in (({"duration_prior": 0.5}, "openai"), ({"method": "dtw"}, "timing method")):
        with pytest.raises(xl.XAttnError, match=match):
            TimingOptions(**{"method": "transformers", **bad})
    with pytest.raises(xl.XAttnError, match="duration_prior >= 0"):
        TimingOptions(duration_prior=-1.0)


def test_fusion_needs_an_alignment_with_a_saliency_map():
    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60,))
    tok = lambda i: f" w{i}"  # noqa: E731
    with pytest.raises(xl.XAttnError, match="saliency map"):
        alignment_token_times(alignment_from(xl.explain(m, b, tokenizer=tok)[0]), timing=TimingOptions(fusion=0.2))


def test_each_heads_times_run_together_equal_each_head_alone():
    from xattn_lightning.timestamps.align import alignment_words, head_words

    m = speaking_tiny_whisper()
    b = whisper_batch(m, lengths=(60, 44))
    tok = lambda i: f" w{i}"  # noqa: E731
    for e in xl.explain(m, b, tokenizer=tok):
        a = alignment_from(e)
        heads = [[li, h] for li in range(2) for h in range(4)]
        for timing in (TimingOptions(), TimingOptions(duration_prior=0.5), TimingOptions(method="transformers")):
            together = alignment_token_times(a, heads, timing=timing, per_head=True)
            assert together.shape == (8, len(a.decoder_ids))
            for t, head in zip(together, heads, strict=True):
                assert t.tolist() == alignment_token_times(a, [head], timing=timing).tolist(), (head, timing)
        assert head_words(a) == [alignment_words(a, [head]) for head in heads]
