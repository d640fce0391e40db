"""Shared set-ups of the saliency tests."""

import pytest
import torch
from helpers import ORACLE_REGIONS, SALIENCY_METHODS, Oracle, oracle_adapter

import xattn_lightning as xl


@pytest.fixture(scope="module")
def oracle_exp():
    model = Oracle(ORACLE_REGIONS)
    x = torch.randn(1, 24, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    (e,) = xl.explain(
        oracle_adapter(model),
        {"input_features": x},
        targets=[[1, 5, 6, 7, 2]],
        methods=SALIENCY_METHODS,
        n_masks=400,
        seed=0,
        n_steps=8,
    )
    return e
