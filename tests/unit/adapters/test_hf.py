"""``xattn_lightning.adapters.hf``: the Hugging Face seq2seq adapter: frames per step, SDPA, a model unpickled elsewhere."""

import torch
from helpers import module_state, tiny_speech2text, tiny_whisper, whisper_batch

import xattn_lightning as xl


def test_frames_per_step_read_from_model():
    w = xl.adapter_for(tiny_whisper())
    assert w.frames_per_step() == 2 and w.encoder_length(37) == 19
    s2t = tiny_speech2text()
    a = xl.adapter_for(s2t)
    assert a.frames_per_step() == 4
    # change the model's subsampler: the adapter follows the model, not a constant
    s2t.model.encoder.conv.conv_layers = s2t.model.encoder.conv.conv_layers[:1]
    assert xl.Speech2TextAdapter(s2t).frames_per_step() == 2


def test_sdpa_model_handled_and_restored():
    model = tiny_whisper(attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.train()
    model.model.encoder.requires_grad_(False)
    before = module_state(model)
    (e,) = xl.explain(model, whisper_batch(model, (30,)), targets=[[51, 52, 5, 50]])
    assert e.cross_attention.abs().sum() > 0
    assert module_state(model) == before


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
