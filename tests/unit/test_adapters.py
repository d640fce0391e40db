import pytest
import torch
from helpers import tiny_speech2text, tiny_whisper, whisper_batch
from torch import nn

import xattn_lightning as xl
from xattn_lightning.testing import TinyS2T


def _state(model):
    return (
        getattr(model.config, "_attn_implementation", None) if hasattr(model, "config") else None,
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_adapter_for_picks_and_rejects():
    assert isinstance(xl.adapter_for(tiny_whisper()), xl.WhisperAdapter)
    assert isinstance(xl.adapter_for(tiny_speech2text()), xl.Speech2TextAdapter)
    with pytest.raises(xl.UnsupportedModelError, match="HookAdapter"):
        xl.adapter_for(TinyS2T())
    with pytest.raises(xl.UnsupportedModelError, match="no nn.MultiheadAttention"):
        xl.adapter_for(nn.Linear(3, 3))


def test_frames_per_step_read_from_model():
    w = xl.adapter_for(tiny_whisper())
    assert w.frames_per_step() == 2 and w.encoder_length(37) == 19
    s2t = tiny_speech2text()
    a = xl.adapter_for(s2t)
    assert a.frames_per_step() == 4
    # change the model's subsampler: the adapter follows the model, not a constant
    s2t.model.encoder.conv.conv_layers = s2t.model.encoder.conv.conv_layers[:1]
    assert xl.Speech2TextAdapter(s2t).frames_per_step() == 2


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


def test_sdpa_model_handled_and_restored():
    model = tiny_whisper(attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.train()
    model.model.encoder.requires_grad_(False)
    before = _state(model)
    (e,) = xl.explain(model, whisper_batch(model, (30,)), targets=[[51, 52, 5, 50]])
    assert e.cross_attention.abs().sum() > 0
    assert _state(model) == before


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


def test_speech2text_trims_padding():
    model = tiny_speech2text()
    feats = torch.randn(2, 50, 12)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 33:] = 0
    exps = xl.explain(model, {"input_features": feats, "attention_mask": mask}, targets=[[2, 5, 6, 2], [2, 7, 2]])
    assert exps[0].cross_attention.shape == (2, 2, 2, 13)
    assert exps[1].cross_attention.shape == (2, 2, 1, 9)
    assert exps[1].features.shape == (33, 12)


def test_hook_adapter_custom_model_and_hooks_removed():
    model = TinyS2T(vocab_size=12).train()
    adapter = TinyS2T.adapter(model)
    n_hooks = _hook_count(model)
    before = _state(model)
    (e,) = xl.explain(adapter, {"input_features": torch.randn(1, 30, 8)}, targets=[[1, 4, 5, 6, 2]])
    assert e.cross_attention.shape == (2, 2, 3, 8)
    assert torch.allclose(e.cross_attention.sum(-1), torch.ones(2, 2, 3), atol=1e-5)
    assert _hook_count(model) == n_hooks and _state(model) == before
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


def test_whisper_decode_matches_forward():
    model = tiny_whisper()
    a = xl.adapter_for(model)
    x = whisper_batch(model, (30,))["input_features"].transpose(1, 2)
    ids = torch.tensor([51, 52, 5])
    with torch.no_grad(), a.capture_context():
        full = a.forward(x, ids)
        dec = a.decode(a.encode(x), ids)
    assert torch.allclose(full.logits, dec.logits, atol=1e-5)


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


def test_bad_targets():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    with pytest.raises(xl.XAttnError, match="only special tokens"):
        xl.explain(model, batch, targets=[[51, 52, 50]])
    with pytest.raises(xl.XAttnError, match="target is empty"):
        xl.explain(model, batch, targets=[[]])
    with pytest.raises(xl.XAttnError, match="at most 24"):
        xl.explain(model, batch, targets=[[51, 52] + [5] * 30 + [50]])
    with pytest.raises(xl.XAttnError, match="labels"):
        xl.explain(model, batch, targets="labels")
    with pytest.raises(xl.UnknownNameError, match="generate"):
        xl.explain(model, batch, targets="reference")
    with pytest.raises(xl.XAttnError, match="2 target sequences for 1"):
        xl.explain(model, batch, targets=[[51, 5, 50], [51, 6, 50]])


def test_model_without_cross_attention():
    class EncoderOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 8)
            self.attn = nn.Linear(8, 8)

        def forward(self, x, ids):
            return self.attn(self.encoder(x))

    adapter = xl.HookAdapter(EncoderOnly(), encoder="encoder", cross_attention="attn", num_heads=1)
    with pytest.raises(xl.XAttnError, match="returned no weights"):
        xl.explain(adapter, {"input_features": torch.randn(1, 8, 8)}, targets=[[1, 4, 2]])


def test_all_silent_utterance_still_works():
    model = tiny_whisper()
    batch = whisper_batch(model, (30,))
    batch["input_features"][:, :, :30] = -0.5  # Whisper log-mel of silence is a constant floor
    (e,) = xl.explain(model, batch, targets=[[51, 52, 5, 6, 50]])
    assert e.num_frames == 30 and torch.isfinite(e.cross_attention).all()


def test_a_model_unpickled_in_a_fresh_process_still_gives_its_cross_attention(tmp_path):
    """transformers 5 registers what a model class can record when a model is constructed; a model that
    arrives pickled (ddp_spawn's workers, torch.load of a whole model) was never constructed there and
    returned no attention weights. Explained in a new process, it gives the attention of the original."""
    import subprocess
    import sys

    from helpers import speaking_tiny_whisper, whisper_batch

    model = speaking_tiny_whisper()
    batch = whisper_batch(model, lengths=(60,))
    torch.save({"model": model, "batch": batch}, tmp_path / "whole.pt")
    (here,) = xl.explain(model, batch, methods=(), targets=[[51, 7, 9, 50]])
    code = (
        "import sys, torch, xattn_lightning as xl\n"
        f"d = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)\n"
        "(e,) = xl.explain(d['model'], d['batch'], methods=(), targets=[[51, 7, 9, 50]])\n"
        f"torch.save(e.cross_attention, {str(tmp_path / 'ca.pt')!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "ca.pt"), here.cross_attention)


def test_the_version_is_the_installed_distribution_s():
    from importlib.metadata import version

    assert xl.__version__ == version("xattn_lightning")


def test_an_adapter_without_split_passes_is_explained_in_whole_passes():
    """``split_passes=False`` (a declared capability, not a raised error): no encoder-only pass is tried, and the
    explanation equals the one made with the shared encoder pass."""
    from xattn_lightning.testing import TinyS2T

    model = TinyS2T()
    split = TinyS2T.adapter(model)

    class Whole(type(split)):
        split_passes = False

        def encode(self, features):
            raise AssertionError("an adapter without split passes was asked for an encoder-only pass")

    whole = TinyS2T.adapter(model)
    whole.__class__ = Whole
    batch = {"input_features": torch.randn(1, 40, 8), "labels": torch.tensor([[1, 5, 6, 7, 2]])}
    (a,) = xl.explain(split, batch, targets="labels", methods=("spes",), n_masks=4)
    (b,) = xl.explain(whole, batch, targets="labels", methods=("spes",), n_masks=4)
    torch.testing.assert_close(a.cross_attention, b.cross_attention)
    torch.testing.assert_close(a.saliency["spes"], b.saliency["spes"])
