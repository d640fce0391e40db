"""``xattn_lightning.adapters.hf_whisper``: Whisper's shapes, padding, special tokens, decoding, bad batches."""

import pytest
import torch
from helpers import tiny_whisper, whisper_batch

import xattn_lightning as xl


@pytest.mark.parametrize("multilingual", [False, True])
def test_whisper_shapes_padding_and_specials(multilingual):
    model = tiny_whisper(multilingual=multilingual)
    batch = whisper_batch(model, lengths=(37, 60))
    a = xl.adapter_for(model)
    prompt = a.prompt_ids()
    assert len(prompt) == (4 if multilingual else 2)
    eos = a.info.eos_id
    targets = [prompt + [5, 6, 7, eos], prompt + [8, 9, eos]]
    exps = xl.explain(model, batch, targets=targets)
    assert [e.cross_attention.shape for e in exps] == [(2, 4, 3, 19), (2, 4, 2, 30)]
    assert exps[0].token_ids.tolist() == [5, 6, 7] and exps[1].token_ids.tolist() == [8, 9]
    assert exps[0].frames_per_step == 2 and exps[0].features.shape == (37, 16)
    assert exps[0].tokens is None
    # rows are attention over the *valid* frames of a 100-frame encoder window: they sum to < 1 after cutting
    full = a.forward(batch["input_features"][:1].transpose(1, 2), torch.tensor(targets[0][:-1]))
    assert torch.allclose(exps[0].cross_attention[0, 0, 0], full.cross_attention[0, 0, 0, len(prompt) - 1, :19])


def test_whisper_labels_with_hf_padding_and_without_start():
    model = tiny_whisper()
    batch = whisper_batch(model, lengths=(40,))
    batch["labels"] = torch.tensor([[52, 5, 6, 50, -100, -100]])  # HF collator: start stripped, -100 padding
    (e,) = xl.explain(model, batch, targets="labels")
    assert e.decoder_ids.tolist() == [51, 52, 5, 6, 50]
    assert e.token_ids.tolist() == [5, 6]


def test_whisper_without_attention_mask_infers_padding():
    model = tiny_whisper()
    batch = whisper_batch(model, lengths=(44,))
    del batch["attention_mask"]
    (e,) = xl.explain(model, batch, targets=[[51, 52, 7, 50]])
    assert e.num_frames == 44 and e.num_encoder_frames == 22


def test_generate_targets_whisper_and_beams():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    a = xl.adapter_for(model)
    try:
        (e,) = xl.explain(model, batch, targets="generate", num_beams=2, max_new_tokens=5)
    except xl.XAttnError as err:  # a random model may emit only special tokens
        assert "only special tokens" in str(err)
    else:
        assert e.decoder_ids[: len(a.prompt_ids())].tolist() == a.prompt_ids()
        assert e.token_ids.numel() <= 5


def test_whisper_decode_matches_forward():
    model = tiny_whisper()
    a = xl.adapter_for(model)
    x = whisper_batch(model, (30,))["input_features"].transpose(1, 2)
    ids = torch.tensor([51, 52, 5])
    with torch.no_grad(), a.capture_context():
        full = a.forward(x, ids)
        dec = a.decode(a.encode(x), ids)
    assert torch.allclose(full.logits, dec.logits, atol=1e-5)


def test_all_silent_utterance_still_works():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    batch["input_features"][:, :, :30] = -0.5  # Whisper log-mel of silence is a constant floor
    (e,) = xl.explain(model, batch, targets=[[51, 52, 5, 6, 50]])
    assert e.num_frames == 30 and torch.isfinite(e.cross_attention).all()
