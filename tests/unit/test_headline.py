"""Issue 12: one encoder pass per probe, the K/V shortcut for encoder-output saliency, and the floor warning
of the monitor (the summary itself: test_summary.py)."""


import pytest
import torch
from helpers import speaking_tiny_whisper, tiny_speech2text, whisper_batch

import xattn_lightning as xl
from xattn_lightning.adapters import Adapter
from xattn_lightning.saliency.perturbation import spes_encoder


def _targets(name, adapter):
    info = adapter.info  # the random Speech2Text says nothing: give it a target
    return [[info.decoder_start_id, 5, 6, 7, info.eos_id]] if name == "s2t" else "generate"


def _setup(name, model, batch):
    adapter = xl.adapter_for(model)
    (e,) = xl.explain(model, batch, targets=_targets(name, adapter))
    (u,) = adapter.utterances(batch)
    with torch.no_grad():
        enc = adapter.encode(u.features.unsqueeze(0))
    return adapter, u, enc, e.decoder_ids


def _models():
    s2t_batch = {"input_features": torch.randn(1, 40, 12, generator=torch.Generator().manual_seed(0))}
    models = [
        ("hf", speaking_tiny_whisper(), whisper_batch(speaking_tiny_whisper(), lengths=(60,))),
        ("s2t", tiny_speech2text(), s2t_batch),
    ]
    try:
        from helpers import mel_batch, random_whisper

        models.append(("openai", random_whisper(), mel_batch(lengths=(60,))))
    except Exception:  # openai-whisper not installed: the HF adapter alone
        pass
    return models


@pytest.mark.parametrize("name,model,batch", _models(), ids=lambda x: x if isinstance(x, str) else "")
def test_kv_shortcut_equals_zeroing_frames(name, model, batch):
    adapter, u, enc, seq = _setup(name, model, batch)
    t = adapter.encoder_length(u.num_frames)
    keep = torch.rand(5, t, generator=torch.Generator().manual_seed(0)) > 0.7
    with torch.no_grad():
        fast = adapter.masked_decoder(enc, seq[:-1])(keep)
        slow = Adapter.masked_decoder(adapter, enc, seq[:-1])(keep)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    positions = (~adapter.special_mask(seq[1:])).nonzero().view(-1)
    with torch.no_grad():
        logp = adapter.decode(enc, seq[:-1]).logits[0].float().log_softmax(-1)
        maps = [
            spes_encoder(run, t, logp, positions, n_masks=64, seed=3).map
            for run in (adapter.masked_decoder(enc, seq[:-1]), Adapter.masked_decoder(adapter, enc, seq[:-1]))
        ]
    assert (maps[0] - maps[1]).abs().max() <= 1e-5
    # only the explained positions projected onto the vocabulary: the same logits at those positions
    with torch.no_grad():
        only = adapter.masked_decoder(enc, seq[:-1], positions=positions)(keep)
        zeroed = Adapter.masked_decoder(adapter, enc, seq[:-1], positions=positions)(keep)
    assert only.shape == (5, positions.numel(), fast.shape[-1])
    torch.testing.assert_close(only, fast[:, positions], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeroed, slow[:, positions], atol=1e-5, rtol=1e-5)
    # positions asked per call (the decoder run only up to the last): the same logits there
    at = positions[:2]
    with torch.no_grad():
        for run, full in ((adapter.masked_decoder(enc, seq[:-1], positions=positions), fast),
                          (Adapter.masked_decoder(adapter, enc, seq[:-1]), slow)):  # fmt: skip
            torch.testing.assert_close(run(keep, at=at), full[:, at], atol=1e-5, rtol=1e-5)
            own = positions[torch.arange(5) % 2].unsqueeze(1)  # each mask its own position, [5, 1]
            want = full[torch.arange(5).unsqueeze(1), own]
            torch.testing.assert_close(run(keep, at=own), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,model,batch", _models(), ids=lambda x: x if isinstance(x, str) else "")
def test_one_encoder_pass_per_probe(name, model, batch):
    encoder = model.encoder if name == "openai" else model.get_encoder()
    calls = []
    h = encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        xl.explain(model, batch, targets=_targets(name, xl.adapter_for(model)), methods=("encoder_spes",), n_masks=40)
    finally:
        h.remove()
    assert len(calls) == 1  # shared by decoding, attention capture and the saliency reference






def test_monitor_warns_once_how_many_masks_reach_the_floor(tmp_path):
    import warnings

    from helpers import fit_demo

    mon = xl.XAttnSaliencyMonitor(num_probes=2, methods=("encoder_spes",), n_masks=8, targets="labels",
                                  max_overhead=None, reliability_floor=0.999)  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit_demo(tmp_path, mon, max_epochs=2)
    msgs = [str(w.message) for w in rec if "floor" in str(w.message)]
    h = mon.history[-1]
    assert h["xattn/encoder_spes/reliability"] < 0.999 and len(mon.history) == 2
    assert len(msgs) == 1 and "n_masks=" in msgs[0]  # once, not at every reading
    assert all("xattn/encoder_spes/pearson_corrected" not in x for x in mon.history)
    assert "xattn/encoder_spes/pearson_ci_low" in h and "xattn/encoder_spes/pearson_ci_high" in h

