"""``xattn_lightning.adapters.hf_speech2text``: Speech2Text's padding."""

import torch
from helpers import tiny_speech2text

import xattn_lightning as xl


def test_speech2text_trims_padding():
    model = tiny_speech2text()
    feats = torch.randn(2, 50, 12)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 33:] = 0
    exps = xl.explain(model, {"input_features": feats, "attention_mask": mask}, targets=[[2, 5, 6, 2], [2, 7, 2]])
    assert exps[0].cross_attention.shape == (2, 2, 2, 13)
    assert exps[1].cross_attention.shape == (2, 2, 1, 9)
    assert exps[1].features.shape == (33, 12)
