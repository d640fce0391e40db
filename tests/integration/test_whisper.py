"""Real Whisper tiny.en on real speech (XL_WHISPER_PATH, XL_ESPEAK_MANIFEST); skipped without them."""

import pytest
import torch
from helpers import processor_batch
from scipy import stats

import xattn_lightning as xl
from xattn_lightning.audio import read_manifest
from xattn_lightning.text import wer

pytestmark = pytest.mark.integration




def test_generate_wer_and_monotonic_attention(real_whisper, espeak_manifest, record_property):
    model, proc = real_whisper
    rows = read_manifest(espeak_manifest)
    exps = []
    for i in range(0, len(rows), 8):
        exps += xl.explain(model, processor_batch(proc, rows[i : i + 8]), targets="generate", tokenizer=proc)
    score = wer([r.text for r in rows], [e.text for e in exps])
    record_property("wer_espeak_greedy", score)
    print(f"\nWER (greedy, {len(rows)} espeak utterances): {score:.1f}%")
    assert score < 15.0  # the model card reports 7.6 %
    mono = []
    for e in exps:
        assert e.cross_attention.shape[:2] == (4, 6)
        assert e.num_encoder_frames == (e.num_frames + 1) // 2 < 1500  # cut to the real length
        peaks = e.attention(layers="last_2").argmax(-1).numpy()
        if len(peaks) >= 3:
            mono.append(stats.spearmanr(range(len(peaks)), peaks)[0])
    mean_mono = float(sum(mono) / len(mono))
    record_property("monotonicity_spearman_last2", mean_mono)
    print(f"Spearman(token index, attention peak frame), last 2 layers head-mean: {mean_mono:.3f}")
    assert mean_mono > 0.8


def test_teacher_forced_references_and_saliency(real_whisper, espeak_manifest):
    model, proc = real_whisper
    rows = read_manifest(espeak_manifest)[:1]
    batch = processor_batch(proc, rows)
    batch["labels"] = proc.tokenizer([rows[0].text], return_tensors="pt").input_ids
    (e,) = xl.explain(
        model, batch, targets="labels", tokenizer=proc, methods=("encoder_spes", "encoder_saliency"), n_masks=64, seed=0
    )
    assert e.text.lower().rstrip(".") == rows[0].text.lower().rstrip(".")
    assert e.saliency["encoder_spes"].shape == (len(e.token_ids), e.num_encoder_frames)
    r = e.agreement("encoder_spes")
    assert -1.0 <= r <= 1.0 and r > 0.0  # attention and encoder saliency point the same way on real speech
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.isfinite(e.saliency["encoder_saliency"]).all()
