"""``xattn_lightning.adapters.hooks``: ``HookAdapter`` on a custom model: its hooks, passes and errors."""

import pytest
import torch
from helpers import module_state, tiny_whisper, whisper_batch

import xattn_lightning as xl
from xattn_lightning.testing import TinyS2T


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hook_adapter_custom_model_and_hooks_removed():
    model = TinyS2T(vocab_size=12).train()
    adapter = TinyS2T.adapter(model)
    n_hooks = _hook_count(model)
    before = module_state(model)
    (e,) = xl.explain(adapter, {"input_features": torch.randn(1, 30, 8)}, targets=[[1, 4, 5, 6, 2]])
    assert e.cross_attention.shape == (2, 2, 3, 8)
    assert torch.allclose(e.cross_attention.sum(-1), torch.ones(2, 2, 3), atol=1e-5)
    assert _hook_count(model) == n_hooks and module_state(model) == before
    assert "forward" not in model.encoder.__dict__


def test_hooks_removed_when_forward_raises():
    model = TinyS2T(vocab_size=12)

    def broken(m, x, ids):
        m.encoder_forward(x)
        raise RuntimeError("boom")

    adapter = xl.HookAdapter(
        model,
        encoder="encoder",
        cross_attention="decoder.layers.*.multihead_attn",
        forward=broken,
        frames_per_step=4,
    )
    n = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        xl.explain(adapter, {"input_features": torch.randn(1, 16, 8)}, targets=[[1, 4, 2]])
    assert _hook_count(model) == n and model.training  # train mode restored after the error


def test_hook_adapter_decode_matches_forward():
    model = TinyS2T(vocab_size=12)
    a = TinyS2T.adapter(model)
    x = torch.randn(1, 20, 8)
    ids = torch.tensor([1, 4, 5])
    with torch.no_grad():
        full = a.forward(x, ids)
        dec = a.decode(full.encoder_out, ids, output_attentions=True)
    assert torch.allclose(full.logits, dec.logits, atol=1e-6)
    assert torch.allclose(full.cross_attention, dec.cross_attention, atol=1e-6)
    # the model is left as it was: same encoder module, no instance attribute shadowing forward
    assert "forward" not in model.encoder.__dict__ and model.get_submodule("encoder") is a.encoder
    # a user's own decoder-only function gives the same as the encoder swap
    own = xl.HookAdapter(
        model,
        encoder="encoder",
        cross_attention="decoder.layers.*.multihead_attn",
        frames_per_step=4,
        decode=lambda m, h, y: m.decoder_forward(h, y),
    )
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        mine = own.decode(full.encoder_out, ids, output_attentions=True)
    assert not calls  # the encoder did not run
    assert torch.allclose(full.logits, mine.logits, atol=1e-6)
    assert torch.allclose(full.cross_attention, mine.cross_attention, atol=1e-6)


def test_hook_adapter_feature_size_from_first_batch():
    model = TinyS2T(vocab_size=12)
    a = xl.HookAdapter(model, encoder="encoder", cross_attention="decoder.layers.*.multihead_attn")
    with pytest.raises(xl.XAttnError, match="needs the feature size"):
        a.decode(torch.randn(1, 5, model.pos.shape[1]), torch.tensor([1, 4]))
    a.utterances({"input_features": torch.randn(1, 20, 8)})
    assert a.info.num_mel_bins == 8
    with pytest.raises(xl.XAttnError, match="Expected 8 feature bins but got 9 .the size of the first batch"):
        a.utterances({"input_features": torch.randn(1, 20, 9)})


def test_hook_adapter_bad_names():
    with pytest.raises(xl.XAttnError, match="no module named"):
        xl.HookAdapter(TinyS2T(), encoder="enc", cross_attention="x")
    with pytest.raises(xl.XAttnError, match="might be"):
        xl.HookAdapter(TinyS2T(), encoder="encoder", cross_attention="decoder.nothing")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: {"wave": torch.randn(1, 100)}, r"no features the model takes: a floating-point tensor \[B, 16, 200\]"),
        (lambda b: {**b, "input_features": b["input_features"][0]}, "rank 3"),
        (lambda b: {**b, "input_features": b["input_features"][:, :8]}, "mel bins"),
        (lambda b: {**b, "input_features": b["input_features"][:, :, :100]}, "30-s window"),
        (
            lambda b: {
                **b,
                "input_features": b["input_features"].index_fill(2, torch.tensor([3]), float("nan")),
            },
            "NaN/inf",
        ),
        (
            lambda b: {
                **b,
                "input_features": b["input_features"].index_fill(2, torch.tensor([3]), float("inf")),
            },
            "NaN/inf",
        ),
        (lambda b: {**b, "attention_mask": torch.zeros_like(b["attention_mask"])}, "no valid frames"),
    ],
)
def test_whisper_bad_batches(mutate, match):
    model = tiny_whisper()
    with pytest.raises(xl.XAttnError, match=match):
        xl.explain(model, mutate(whisper_batch(model, (30,))), targets=[[51, 52, 5, 50]])
