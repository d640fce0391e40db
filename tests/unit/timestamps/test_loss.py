"""The alignment loss: trained heads time words better; errors say what to do."""

import pytest
import torch
from helpers import tiny_whisper

import xattn_lightning as xl
from xattn_lightning.functional.alignment import boundary_errors, span_target, token_spans
from xattn_lightning.timestamps import align, alignment_words

TOK = lambda i: f" w{int(i)}"  # noqa: E731  every token a word
LABELS = torch.tensor([[52, 5, 9, 12, 7, 50, -100], [52, 14, 6, 50, -100, -100, -100]])  # prompt, text, EOS, padding
WORDS = [
    [("w5", 0.0, 0.4), ("w9", 0.4, 0.8), ("w12", 0.8, 1.2), ("w7", 1.2, 1.8)],
    [("w14", 0.2, 1.0), ("w6", 1.0, 1.6)],
]
HEADS = [[1, 0], [1, 2]]


def _batch():
    return {"input_features": torch.randn(2, 16, 200, generator=torch.Generator().manual_seed(1))}


def _errors(model, batch, heads):
    errs = []
    for b, (lab, words) in enumerate(zip(LABELS, WORDS)):
        seq = [51, *[int(t) for t in lab if t != -100]]
        a = align(model, {"input_features": batch["input_features"][b : b + 1]}, tokenizer=TOK, targets=[seq])[0]
        errs += boundary_errors(alignment_words(a, heads), words)
    return sum(errs) / len(errs)


def test_training_the_heads_towards_the_spans_times_the_words_better():
    model = tiny_whisper(attn="eager").train()
    batch = _batch()
    loss_fn = xl.AlignmentLoss(model, HEADS, tokenizer=TOK)
    before = _errors(model.eval(), batch, HEADS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(60):
        out = model(input_features=batch["input_features"], labels=LABELS.clamp(min=0), output_attentions=True)
        loss = loss_fn(out.cross_attentions, LABELS, WORDS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = _errors(model.eval(), batch, HEADS)
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert after < 0.5 * before, (before, after)
    assert loss_fn.export() == "generation_config.alignment_heads"
    assert model.generation_config.alignment_heads == HEADS


def test_rows_follow_the_labels_and_untimed_utterances_add_nothing():
    model = tiny_whisper(attn="eager")
    loss_fn = xl.AlignmentLoss(model, [[0, 1]], tokenizer=TOK, ramp_frames=0)
    out = model(input_features=_batch()["input_features"], labels=LABELS.clamp(min=0), output_attentions=True)
    ca = torch.stack(out.cross_attentions, 1)  # [B, L, H, S, T']
    # an attention that is exactly the target for utterance 0 (rows 0..3): zero loss there
    ideal = ca.detach().clone()
    target = span_target(token_spans([TOK(t) for t in LABELS[0, 1:5]], WORDS[0]), ca.shape[-1], 0.02, 0)
    ideal[0, 0, 1, 1:5] = target  # rows 1..4 predict the text tokens
    ideal[0, 0, 1, 5] = span_target([(1.8, 1.9)], ca.shape[-1], 0.02, 0)[0]  # row 5 predicts EOS: after the last word
    assert float(loss_fn(ideal, LABELS, [WORDS[0], None])) == pytest.approx(0.0, abs=1e-6)
    assert float(loss_fn(ca, LABELS, [WORDS[0], None])) > 0.1
    zero = loss_fn(out.cross_attentions, LABELS, [None, None])
    assert float(zero) == 0.0 and zero.requires_grad  # a batch without timings still backpropagates


def test_bad_use_is_a_clear_error():
    model = tiny_whisper(attn="eager")
    with pytest.raises(xl.XAttnError, match="outside the model's 2 layers x 4 heads"):
        xl.AlignmentLoss(model, [[2, 0]], tokenizer=TOK)
    with pytest.raises(xl.XAttnError, match="tokenizer"):
        xl.AlignmentLoss(model, HEADS)
    loss_fn = xl.AlignmentLoss(model, HEADS, tokenizer=TOK)
    with pytest.raises(xl.XAttnError, match="attn_implementation='eager'"):
        loss_fn((None, None), LABELS, WORDS)
    with pytest.raises(xl.XAttnError, match="utterances"):
        loss_fn(torch.zeros(1, 2, 4, 7, 100), LABELS, WORDS)
