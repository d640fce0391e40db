"""EncoderCache: a probe's encoder output is reused only while nothing that decides it changed."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyWhisperModule, cpu_trainer, tiny_whisper, whisper_batch
from test_headline import _models, _targets

import xattn_lightning as xl


def _encoder(name, model):
    return model.encoder if name == "openai" else model.get_encoder()


def _explain(name, model, batch, cache=None):
    (e,) = xl.explain(
        model,
        batch,
        targets=_targets(name, xl.adapter_for(model)),
        methods=("encoder_spes",),
        n_masks=16,
        encoder_cache=cache,
    )
    return e


def _same(a, b):
    assert a.decoder_ids.tolist() == b.decoder_ids.tolist()
    torch.testing.assert_close(a.cross_attention, b.cross_attention, rtol=0, atol=0)
    torch.testing.assert_close(a.saliency_map("encoder_spes"), b.saliency_map("encoder_spes"), rtol=0, atol=0)


def _count_encoder_runs(name, model):
    calls = []
    handle = _encoder(name, model).register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("name,model,batch", _models(), ids=lambda x: x if isinstance(x, str) else "")
def test_cached_encoder_output_skips_the_encoder_and_changes_nothing(name, model, batch):
    cache = xl.EncoderCache()
    plain = _explain(name, model, batch)
    calls, handle = _count_encoder_runs(name, model)
    try:
        first = _explain(name, model, batch, cache)
        second = _explain(name, model, batch, cache)
    finally:
        handle.remove()
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    _same(first, plain)
    _same(second, plain)


@pytest.mark.parametrize("name,model,batch", _models(), ids=lambda x: x if isinstance(x, str) else "")
def test_any_change_to_the_encoder_weights_runs_it_again(name, model, batch):
    cache = xl.EncoderCache()
    _explain(name, model, batch, cache)
    param = next(_encoder(name, model).parameters())
    changes = [
        lambda: param.add_(1e-3),  # in place: the version counter moves
        lambda: param.data.mul_(1.01),  # through .data: only the checksum sees it
    ]
    for change in changes:
        with torch.no_grad():
            change()
        cached = _explain(name, model, batch, cache)
        _same(cached, _explain(name, model, batch))
    assert cache.hits == 0 and cache.misses == 3
    assert len(cache) == 1  # entries of an older encoder state are dropped


def test_other_features_or_train_mode_run_the_encoder():
    adapter = xl.adapter_for(tiny_whisper().eval())
    cache = xl.EncoderCache()
    a, b = (adapter.utterances(whisper_batch(adapter.model, (60,), s))[0].features[None] for s in (0, 1))
    out_a = cache.encode(adapter, a)
    assert torch.equal(cache.encode(adapter, a), out_a) and cache.hits == 1
    out_b = cache.encode(adapter, b)
    assert not torch.equal(out_a, out_b) and cache.misses == 2 and len(cache) == 2
    out_a.zero_()  # the caller owns what it gets: the stored output is not touched
    assert not torch.equal(cache.encode(adapter, a), out_a) and cache.hits == 2
    adapter.model.train()
    cache.encode(adapter, a)
    assert cache.misses == 3  # dropout: never from the cache
    with pytest.raises(ValueError, match="max_entries"):
        xl.EncoderCache(max_entries=0)


class _FrozenEncoder(TinyWhisperModule):
    """The usual way to fine-tune Whisper cheaply: the encoder frozen, the decoder trained."""

    def configure_optimizers(self):
        self.model.get_encoder().requires_grad_(False)
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.parametrize("module_cls,frozen", [(TinyWhisperModule, False), (_FrozenEncoder, True)])
def test_monitor_reuses_encoder_outputs_while_the_encoder_is_frozen(tmp_path, module_cls, frozen):
    """A training script without validation (tuple batches, probes given): with the encoder frozen
    the second reading takes every probe's encoder output from the cache, and its numbers equal
    those of a monitor without the cache; with the encoder trained it never hits."""
    from torch.utils.data import DataLoader, TensorDataset

    probes = [whisper_batch(tiny_whisper(), lengths=(60,), seed=s) for s in range(3)]

    def fit(cache_encoder):
        pl.seed_everything(0)
        data = TensorDataset(torch.randn(4, 16, 200), torch.randint(0, 50, (4, 5)))
        module = module_cls()
        monitor = xl.XAttnSaliencyMonitor(
            probes=probes, n_masks=8, log_figures=False, max_overhead=None, cache_encoder=cache_encoder
        )
        trainer = cpu_trainer(tmp_path, [monitor], max_epochs=2)
        trainer.fit(module, DataLoader(data, batch_size=2))
        return monitor

    cached, uncached = fit(True), fit(False)
    assert uncached.instrument.reader.encoder_cache is None and len(cached.history) == 2
    assert (cached.instrument.reader.encoder_cache.hits, cached.instrument.reader.encoder_cache.misses) == ((3, 3) if frozen else (0, 6))
    for a, b in zip(cached.history, uncached.history):
        keys = [k for k in a if k.startswith("xattn/") and k != "xattn/seconds"]
        assert keys and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in keys)
