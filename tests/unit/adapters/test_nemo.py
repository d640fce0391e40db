"""The monitor in NVIDIA NeMo attention-encoder-decoder fine-tunes (a tiny Canary-style model built from a config,
no pretrained checkpoint offline). NeMo pins ``lightning<=2.4.0``, so these tests run in their own environment:
``.ci/run`` installs ``nemo-toolkit[asr]`` after the main run and runs this file there; without NeMo they skip."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("nemo.collections.asr", reason="NeMo is an optional extra (pip install 'xattn_lightning[nemo]')")

import xattn_lightning as xl  # noqa: E402
from xattn_lightning.adapters.nemo import NemoAEDAdapter, nemo_batch  # noqa: E402


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, espeak_manifest):
    root = tmp_path_factory.mktemp("nemo")
    lines = Path(espeak_manifest).read_text().splitlines()
    base = Path(espeak_manifest).parent

    def write(name: str, rows: list[str]) -> Path:
        body = ["\t".join(c if i != 1 else str(base / c) for i, c in enumerate(r.split("\t"))) for r in rows]
        path = root / name
        path.write_text("\n".join([lines[0], *body]) + "\n")
        return path

    return write("train.tsv", lines[1:9]), write("val.tsv", lines[9:13]), root


@pytest.fixture(scope="module")
def tiny(manifests):
    from xattn_lightning.audio import read_manifest
    from xattn_lightning.testing.nemo import build_tokenizers, tiny_canary

    train, val, root = manifests
    texts = [r.text for m in (train, val) for r in read_manifest(m)]
    return tiny_canary(build_tokenizers(texts, root / "tok")).eval()


def _batch(model, wav_path: str, text: str) -> dict:
    from xattn_lightning.audio import load_audio

    adapter = xl.adapter_for(model)
    wav = load_audio(wav_path).unsqueeze(0)
    ids = model.tokenizer.text_to_ids(text, "en")
    labels = torch.tensor([adapter.prompt_ids() + list(ids) + [adapter.info.eos_id]])
    return {"input_signal": wav, "input_signal_length": torch.tensor([wav.shape[1]]), "labels": labels}


def test_the_adapter_is_found_and_reads_every_decoder_layer(tiny, manifests):
    from xattn_lightning.audio import read_manifest

    row = read_manifest(manifests[0])[0]
    adapter = xl.adapter_for(tiny)
    assert isinstance(adapter, NemoAEDAdapter) and adapter.prompt_ids() == [4, 9, 8, 9, 5]
    batch = _batch(tiny, str(row.audio), row.text)
    (e,) = xl.explain(tiny, batch, targets="labels", methods=("encoder_spes", "spes"), n_masks=16)
    u = adapter.utterances(batch)[0]
    frames = adapter.encoder_length(u.num_frames)
    n_text = len(tiny.tokenizer.text_to_ids(row.text, "en"))  # the prompt's and the EOS' rows dropped
    assert e.cross_attention.shape == (2, 4, n_text, frames)
    assert torch.allclose(e.cross_attention.sum(-1), torch.ones(2, 4, n_text), atol=1e-5)
    assert e.saliency["encoder_spes"].shape == (n_text, frames)
    assert e.saliency["spes"].shape == (n_text, u.num_frames, 64)  # on NeMo's own spectrogram
    assert e.text == row.text
    assert adapter.frame_rate == e.frame_rate == 1 / tiny.cfg.preprocessor.window_stride  # from the model


def test_captured_attention_equals_a_recomputation_from_the_layer_inputs(tiny, manifests):
    from xattn_lightning.audio import read_manifest

    row = read_manifest(manifests[0])[1]
    adapter = xl.adapter_for(tiny)
    batch = _batch(tiny, str(row.audio), row.text)
    u = adapter.utterances(batch)[0]
    seq = adapter.normalize_target(batch["labels"][0])
    inputs: list = []
    hooks = [layer.second_sub_layer.register_forward_hook(lambda m, a, o: inputs.append((m, a)))
             for layer in tiny.transf_decoder.decoder.layers]  # fmt: skip
    try:
        with torch.no_grad():
            out = adapter.forward(u.features[None], seq[None])
    finally:
        for h in hooks:
            h.remove()
    for layer, (m, (q, k, _v, mask)) in enumerate(inputs):
        heads, d = m.num_attention_heads, q.shape[-1] // m.num_attention_heads

        def split(x, heads=heads, d=d):
            return x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

        scores = split(m.query_net(q) / m.attn_scale) @ split(m.key_net(k) / m.attn_scale).transpose(-1, -2)
        probs = torch.softmax(scores + mask, dim=-1)
        torch.testing.assert_close(out.cross_attention[:, layer], probs)


def test_batches_of_nemo_are_understood_without_batch_fn(tiny):
    audio, lens = torch.randn(2, 1600), torch.tensor([1600, 1200])
    tokens, tokens_lens = torch.tensor([[4, 11, 12, 3], [4, 13, 3, 2]]), torch.tensor([4, 3])
    got = xl.adapter_for(tiny).model_batch((audio, lens, tokens, tokens_lens))
    assert got["labels"].tolist() == [[4, 11, 12, 3], [4, 13, 3, -100]] and got["input_signal"] is audio
    assert nemo_batch((torch.randn(2, 3), torch.randn(2, 3))) is None
    other = xl.adapter_for(tiny).model_batch({"wave": audio, "wave_lens": lens})  # any other layout, by what it holds
    assert other["input_signal"] is audio and other["input_signal_length"].tolist() == [1600, 1200]


def test_the_library_takes_nemos_own_mini_batch(tiny, manifests):
    """``xl.explain`` (and so word timestamps and head choice) reads NeMo's ``PromptedAudioToTextMiniBatch`` as
    the monitor does, with the same result as the model's batch dict."""
    import dataclasses

    from nemo.collections.asr.data.audio_to_text_lhotse_prompted import PromptedAudioToTextMiniBatch

    from xattn_lightning.audio import read_manifest

    row = read_manifest(manifests[0])[2]
    batch = _batch(tiny, str(row.audio), row.text)
    ids = batch["labels"]
    values = {
        "audio": batch["input_signal"], "audio_lens": batch["input_signal_length"],
        "prompted_transcript": ids, "prompted_transcript_lens": torch.tensor([ids.shape[1]]),
        "transcript": ids[:, 5:], "transcript_lens": torch.tensor([ids.shape[1] - 5]),
        "prompt": ids[:, :5], "prompt_lens": torch.tensor([5]),
    }  # fmt: skip
    mini = PromptedAudioToTextMiniBatch(**{f.name: values.get(f.name) for f in dataclasses.fields(PromptedAudioToTextMiniBatch)})
    (a,) = xl.explain(tiny, mini, targets="labels", methods=("encoder_spes",), n_masks=8)
    (b,) = xl.explain(tiny, batch, targets="labels", methods=("encoder_spes",), n_masks=8)
    torch.testing.assert_close(a.cross_attention, b.cross_attention)
    torch.testing.assert_close(a.saliency["encoder_spes"], b.saliency["encoder_spes"])


def _finetune(manifests, out: Path, monitor: bool):
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "examples" / "finetune_nemo_aed.py"
    spec = importlib.util.spec_from_file_location(f"finetune_nemo_{out.name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, val, _ = manifests
    args = ["--tiny", "--manifest", str(train), "--val-manifest", str(val), "--max-steps", "4", "--val-every", "2",
            "--n-masks", "32", "--targets", "labels", "--max-overhead", "none", "--out", str(out)]  # fmt: skip
    return mod.main(args + ([] if monitor else ["--no-monitor", "--no-wandb"]))


def test_nemo_trainer_fit_with_the_monitor_as_the_one_added_line(manifests, tmp_path, monkeypatch):
    import wandb
    from wandb_reader import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    on = _finetune(manifests, tmp_path / "on", monitor=True)
    assert wandb.run is not None
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    off = _finetune(manifests, tmp_path / "off", monitor=False)

    assert len(on["history"]) == 2  # a reading after each of the two validations
    for h in on["history"]:
        assert h["xattn/num_probes"] == 2 and h["xattn/num_failed"] == 0
        assert -1 <= h["xattn/encoder_spes/pearson"] <= 1 and h["xattn/encoder_spes/n_masks"] == 32
    (path,) = glob.glob(str(tmp_path / "on" / "csv" / "lightning_logs" / "*" / "metrics.csv"))
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("xattn/encoder_spes/pearson")]
    val_steps = []
    with open(path) as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert [int(r["step"]) for r in rows] == val_steps  # at the step of NeMo's own validation metrics
    (run_file,) = glob.glob(str(run_dir / "run-*.wandb"))
    logged = history(run_file)
    assert len([r for r in logged if "xattn/encoder_spes/pearson" in r]) == 2
    assert [r["xattn/heatmaps/count"] for r in logged if "xattn/heatmaps/count" in r] == [2, 2]
    for (name, a), b in zip(on["model"].state_dict().items(), off["model"].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs: the monitor changed NeMo's training"
    assert os.path.exists(tmp_path / "on" / "train.jsonl")


def test_encdec_transf_bpe_reads_through_the_same_adapter(manifests):
    """``EncDecTransfModelBPE`` (a plain SentencePiece tokenizer, a BOS prompt, its own beam search) and its tuple
    batches ``(audio, audio_lens, tokens, tokens_lens)``."""
    from xattn_lightning.audio import load_audio, read_manifest
    from xattn_lightning.testing.nemo import tiny_transf_bpe

    train, val, root = manifests
    rows = read_manifest(train)
    model = tiny_transf_bpe([r.text for r in rows], root / "tok_bpe").eval()
    adapter = xl.adapter_for(model)
    tok = model.tokenizer
    assert isinstance(adapter, NemoAEDAdapter) and adapter.prompt_ids() == [tok.bos_id]
    wav = load_audio(rows[0].audio).unsqueeze(0)
    text_ids = tok.text_to_ids(rows[0].text)
    tokens = torch.tensor([[tok.bos_id, *text_ids, tok.eos_id]])
    batch = adapter.model_batch((wav, torch.tensor([wav.shape[1]]), tokens, torch.tensor([tokens.shape[1]])))
    (e,) = xl.explain(model, batch, targets="labels", methods=("encoder_spes",), n_masks=8)
    assert e.cross_attention.shape[:3] == (2, 4, len(text_ids)) and e.text == rows[0].text
    hyp = adapter.generate(adapter.utterances(batch)[0], max_new_tokens=5)
    assert int(hyp[0]) == tok.bos_id and int(hyp[-1]) == tok.eos_id and len(hyp) <= 7


def test_the_key_value_shortcut_equals_zeroing_frames(tiny, manifests):
    """Encoder-output masks through keys and values projected once equal zeroing the frames and decoding."""
    from xattn_lightning.adapters.base import Adapter
    from xattn_lightning.audio import read_manifest

    row = read_manifest(manifests[0])[2]
    adapter = xl.adapter_for(tiny)
    batch = _batch(tiny, str(row.audio), row.text)
    u = adapter.utterances(batch)[0]
    seq = adapter.normalize_target(batch["labels"][0])[:-1]
    positions = torch.arange(4, seq.numel())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), adapter.capture_context():
        enc = adapter.encode(u.features[None])
        keep = torch.rand(6, enc.shape[1], generator=g) > 0.7
        keep[0] = True  # nothing occluded
        fast = adapter.masked_decoder(enc, seq, positions)(keep)
        slow = Adapter.masked_decoder(adapter, enc, seq, positions)(keep)
        at = positions[1:3]  # asked per call, the decoder run only up to the last of them
        early = adapter.masked_decoder(enc, seq, positions)(keep, at=at)
        own = positions[torch.arange(6) % 3].unsqueeze(1)  # each mask its own position, [6, 1]
        each = adapter.masked_decoder(enc, seq, positions)(keep, at=own)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(early, fast[:, 1:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(each, fast[torch.arange(6).unsqueeze(1), torch.arange(6).unsqueeze(1) % 3], atol=1e-5, rtol=1e-5)
    layer = tiny.transf_decoder.decoder.layers[0].second_sub_layer
    assert "forward" not in vars(layer)  # the layers are left as they were
