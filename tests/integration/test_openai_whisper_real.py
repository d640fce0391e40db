"""openai-whisper models through xl.adapter_for: cross-attention equal to the Hugging Face model's,
SDPA switched back, generation, saliency, and the WhisperModelModule-style example."""


import pytest
import torch

import xattn_lightning as xl

whisper = pytest.importorskip("whisper", reason="openai-whisper is an optional extra: pip install openai-whisper")
from whisper.model import MultiHeadAttention  # noqa: E402

from xattn_lightning.adapters.openai_whisper import openai_whisper_from_hf  # noqa: E402


@pytest.mark.integration
def test_real_tiny_en_cross_attention_equals_hugging_face(real_whisper, espeak_manifest):
    """The real Whisper tiny.en converted to openai-whisper: same hypotheses, same cross-attention and
    encoder-output saliency as the Hugging Face model on real speech."""
    from helpers import processor_batch

    from xattn_lightning.audio import read_manifest

    hf, proc = real_whisper
    oa = openai_whisper_from_hf(hf)
    batch = processor_batch(proc, read_manifest(espeak_manifest)[:2])
    kw = {"methods": ("encoder_spes",), "n_masks": 16, "vocabulary": "exact"}  # the same float32 term in both
    e_hf = xl.explain(hf, batch, tokenizer=proc, **kw)
    e_oa = xl.explain(oa, batch, **kw)
    for a, b in zip(e_hf, e_oa):
        assert b.text == a.text and b.token_ids.tolist() == a.token_ids.tolist()
        torch.testing.assert_close(b.cross_attention, a.cross_attention, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(b.saliency["encoder_spes"], a.saliency["encoder_spes"], atol=1e-4, rtol=1e-3)
    assert MultiHeadAttention.use_sdpa is True
