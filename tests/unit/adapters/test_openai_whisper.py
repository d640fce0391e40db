"""openai-whisper models through xl.adapter_for: cross-attention equal to the Hugging Face model's,
SDPA switched back, generation, saliency, and the WhisperModelModule-style example."""

import warnings

import pytest
import torch

import xattn_lightning as xl

whisper = pytest.importorskip("whisper", reason="openai-whisper is an optional extra: pip install openai-whisper")
from helpers import EN_VOCAB, mel_batch, openai_whisper_checkpoint, random_whisper  # noqa: E402
from whisper.model import MultiHeadAttention  # noqa: E402

from xattn_lightning.adapters.openai_whisper import OpenAIWhisperAdapter, openai_whisper_from_hf  # noqa: E402


def tiny_hf_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=EN_VOCAB, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=50, max_target_positions=24, decoder_start_token_id=50257, eos_token_id=50256,
        pad_token_id=50256, bos_token_id=50256,
    )  # fmt: skip
    return WhisperForConditionalGeneration(cfg).eval()


def test_adapter_for_finds_openai_whisper_directly_and_inside_a_module():
    model = random_whisper()
    a = xl.adapter_for(model)
    assert isinstance(a, OpenAIWhisperAdapter)
    assert (a.info.num_layers, a.info.num_heads, a.frames_per_step(), a.encoder_length(100)) == (2, 2, 2, 50)
    assert a.prompt_ids() == [50257, 50362]  # <|startoftranscript|><|notimestamps|>

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    assert isinstance(xl.adapter_for(Module()), OpenAIWhisperAdapter)


def test_cross_attention_equals_hugging_face_for_the_same_weights():
    hf = tiny_hf_whisper()
    oa = openai_whisper_from_hf(hf)
    batch = mel_batch()
    ids = [[50257, 50362, 11, 12, 13, 50256], [50257, 50362, 7, 8, 50256]]
    e_hf = xl.explain(hf, batch, targets=ids)
    e_oa = xl.explain(oa, batch, targets=ids)
    for a, b in zip(e_hf, e_oa):
        assert a.cross_attention.shape == b.cross_attention.shape
        torch.testing.assert_close(b.cross_attention, a.cross_attention, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-4, rtol=1e-4)
    # the package's SDPA switch is restored, and no hook is left behind
    assert MultiHeadAttention.use_sdpa is True
    assert all(not m._forward_hooks for m in oa.modules())


def test_saliency_generation_and_text_on_random_weights():
    model = random_whisper()
    calls = []
    h = model.encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        (e,) = xl.explain(model, mel_batch(lengths=(60,)), methods=("encoder_spes",), n_masks=64, max_new_tokens=5)
        n_enc = len(calls)
        xl.explain(model, mel_batch(lengths=(60,)), methods=("encoder_spes",), n_masks=8, max_new_tokens=5)
    finally:
        h.remove()
    assert n_enc == len(calls) - n_enc  # the encoder runs a fixed number of times, whatever the mask count
    assert e.saliency["encoder_spes"].shape == (e.token_ids.numel(), 30)
    assert not bool(xl.adapter_for(model).special_mask(e.token_ids).any())  # no timestamps or tags generated
    assert isinstance(e.text, str) and e.tokens is not None and len(e.tokens) == e.token_ids.numel()
    (s,) = xl.explain(model, mel_batch(lengths=(60,)), targets=[[50257, 50362, 11, 12, 50256]], methods=("spes",),
                      n_masks=8)  # fmt: skip
    assert s.saliency["spes"].shape == (2, 60, 80) and torch.isfinite(s.saliency["spes"]).all()


def test_wrong_window_is_a_clear_error():
    model = random_whisper()
    with pytest.raises(xl.XAttnError, match="pad_or_trim"):
        xl.explain(model, {"input_features": torch.randn(1, 80, 64)}, targets=[[50257, 11, 50256]])


@pytest.mark.parametrize("no_val", [False, True])
def test_openai_whisper_example_shortened(tmp_path, no_val):
    from helpers import load_example, tone_manifest

    ex = load_example("finetune_openai_whisper")
    manifest = tone_manifest(tmp_path, n=4)
    argv = ["--model", str(openai_whisper_checkpoint(tmp_path)), "--manifest", str(manifest), "--epochs", "2",
            "--batch-size", "2", "--num-probes", "2", "--n-masks", "8", "--lr", "1e-3", "--out", str(tmp_path / "run"),
            "--accelerator", "cpu", "--max-overhead", "none"] + (["--no-val"] if no_val else [])  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = ex.main(argv)
    messages = [
        str(w.message)
        for w in rec
        if "XAttnSaliencyMonitor" in str(w.message) and "pearson_corrected is not logged" not in str(w.message)
    ]
    assert not messages, messages  # found the model, the tokenizer and the batch layout by itself
    mon = res["monitor"]
    assert len(mon.history) == 2 and all(h["xattn/num_probes"] == 2.0 for h in mon.history)
    assert mon.probe_ids == (["probe0", "probe1"] if no_val else ["val0", "val1"])
    e = mon.last_explanations[0]
    assert e.tokens is not None and isinstance(e.text, str)  # openai-whisper's own tokenizer gave text




def test_a_lora_wrapped_openai_whisper_explains_like_the_merged_model():
    from helpers import lora_model

    pm = lora_model(random_whisper(), target_modules=("query", "value")).eval()

    class Lit(torch.nn.Module):  # a LightningModule's .model holding the PeftModel
        def __init__(self) -> None:
            super().__init__()
            self.model = pm

    assert type(xl.adapter_for(Lit())).__name__ == "OpenAIWhisperAdapter"
    opts = dict(methods=("encoder_spes",), n_masks=16, max_new_tokens=4)
    (lora,) = xl.explain(Lit(), mel_batch(lengths=(80,)), **opts)
    (merged,) = xl.explain(pm.merge_and_unload(), mel_batch(lengths=(80,)), **opts)
    assert torch.equal(lora.token_ids, merged.token_ids)
    torch.testing.assert_close(lora.cross_attention, merged.cross_attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lora.saliency["encoder_spes"], merged.saliency["encoder_spes"], atol=1e-5, rtol=1e-4)


def test_alignment_heads_applied_are_the_ones_openai_whisper_times_words_with():
    """``apply=True`` writes openai-whisper's ``alignment_heads`` buffer, which ``whisper.timing.find_alignment``
    (``transcribe(word_timestamps=True)``) reads; the adapter reads it back."""
    model = random_whisper()
    adapter = xl.adapter_for(model)
    fallback = adapter.alignment_heads()  # the package's default: every head of the upper half of the layers
    assert fallback == [[1, 0], [1, 1]]
    heads = xl.alignment_heads(model, [mel_batch(lengths=(60,))], apply=True, k=1, n_masks=16, max_new_tokens=4)
    assert len(heads) == 1
    assert model.alignment_heads.indices().T.tolist() == heads  # what find_alignment iterates over
    assert adapter.alignment_heads() == heads
    with pytest.raises(xl.XAttnError, match="outside the model"):
        adapter.set_alignment_heads([[5, 0]])


def test_the_monitor_exports_heads_into_an_openai_whisper_model():
    from xattn_lightning.monitoring import Instrument, MonitorConfig

    model = random_whisper()
    inst = Instrument(MonitorConfig())
    inst.publisher.alignment_heads = [[0, 1], [1, 0]]
    inst.export_alignment_heads(xl.adapter_for(model))
    assert sorted(model.alignment_heads.indices().T.tolist()) == [[0, 1], [1, 0]]


def test_the_bf16_vocabulary_term_reaches_openai_whisper_through_its_tied_head(monkeypatch):
    from xattn_lightning.functional import map_similarity
    from xattn_lightning.saliency import vocabulary

    model = random_whisper()
    head = xl.adapter_for(model).output_head()
    assert head.weight is model.decoder.token_embedding.weight  # the tied embedding itself, no copy
    batch, kw = mel_batch(lengths=(60,)), {"targets": [[50257, 50362, 11, 12, 13, 50256]], "n_masks": 48}
    (exact,) = xl.explain(model, batch, methods=("encoder_spes",), vocabulary="exact", **kw)
    (bf16,) = xl.explain(model, batch, methods=("encoder_spes",), vocabulary="bf16", **kw)
    monkeypatch.setattr(vocabulary, "has_bf16_units", lambda device: True)
    (auto,) = xl.explain(model, batch, methods=("encoder_spes",), **kw)
    assert [e.results["encoder_spes"].details["vocabulary"] for e in (exact, bf16, auto)] == ["exact", "bf16", "bf16"]
    torch.testing.assert_close(auto.saliency["encoder_spes"], bf16.saliency["encoder_spes"], rtol=0, atol=0)
    assert not torch.equal(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"])  # it did run in bf16
    assert map_similarity(exact.saliency["encoder_spes"], bf16.saliency["encoder_spes"]) > 0.9


def test_audio_of_any_length_through_a_bare_feature_extractor_and_the_models_own_tokenizer():
    from transformers import WhisperFeatureExtractor

    model = random_whisper()  # a 1-s window (50 encoder frames)
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    wav = 0.1 * torch.randn(40000, generator=torch.Generator().manual_seed(0))
    out = xl.audio_word_timestamps(model, [wav], processor=fe, heads="all")[0]  # no tokenizer: the model's own
    assert out.pieces[0][0] == 0 and out.pieces[-1][1] == pytest.approx(2.5) and len(out.pieces) >= 3
    assert all(b - a <= 1.0 and a == prev for (a, b), (_, prev) in zip(out.pieces, [(0, 0.0), *out.pieces]))
    assert all(0 <= s <= e <= 2.5 + 1e-9 for _, s, e in out.words)
    with pytest.raises(xl.XAttnError, match="texts= tokenizes the texts with a Hugging Face tokenizer"):
        xl.audio_word_timestamps(model, [wav[:8000]], processor=fe, texts=["hello"])
