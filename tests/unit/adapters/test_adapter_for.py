"""``xattn_lightning.adapters``: which adapter a model gets (``adapter_for``), and the package version."""

import pytest
import torch
from helpers import tiny_speech2text, tiny_whisper
from torch import nn

import xattn_lightning as xl
from xattn_lightning.testing import TinyS2T


def test_adapter_for_picks_and_rejects():
    assert isinstance(xl.adapter_for(tiny_whisper()), xl.WhisperAdapter)
    assert isinstance(xl.adapter_for(tiny_speech2text()), xl.Speech2TextAdapter)
    with pytest.raises(xl.UnsupportedModelError, match="HookAdapter"):
        xl.adapter_for(TinyS2T())
    with pytest.raises(xl.UnsupportedModelError, match="no nn.MultiheadAttention"):
        xl.adapter_for(nn.Linear(3, 3))


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


def test_the_version_is_the_installed_distribution_s():
    from importlib.metadata import version

    assert xl.__version__ == version("xattn_lightning")
