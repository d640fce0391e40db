"""Adapters: the only code that knows a model family."""

from __future__ import annotations

from torch import nn

from xattn_lightning.adapters.base import Adapter, AdapterInfo, ForwardOutput, Utterance
from xattn_lightning.adapters.hf import Speech2TextAdapter, WhisperAdapter
from xattn_lightning.adapters.hooks import HookAdapter
from xattn_lightning.errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "AdapterInfo",
    "ForwardOutput",
    "HookAdapter",
    "Speech2TextAdapter",
    "Utterance",
    "WhisperAdapter",
    "adapter_for",
]


def adapter_for(model: nn.Module | Adapter, tokenizer: object | None = None) -> Adapter:
    """Pick the adapter for ``model`` (an adapter is returned as it is).

    >>> adapter_for(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.UnsupportedModelError: No adapter knows Linear...
    """
    if isinstance(model, Adapter):
        if tokenizer is not None and model.tokenizer is None:
            model.tokenizer = tokenizer
        return model
    name = type(model).__name__
    try:
        from transformers import Speech2TextForConditionalGeneration, WhisperForConditionalGeneration
    except ImportError:  # pragma: no cover - transformers is a dependency
        WhisperForConditionalGeneration = Speech2TextForConditionalGeneration = ()  # type: ignore[assignment]
    if isinstance(model, WhisperForConditionalGeneration):
        return WhisperAdapter(model, tokenizer)
    if isinstance(model, Speech2TextForConditionalGeneration):
        return Speech2TextAdapter(model, tokenizer)
    for attr in ("model", "net", "module"):  # a LightningModule wrapping an HF model
        inner = getattr(model, attr, None)
        if isinstance(inner, (WhisperForConditionalGeneration, Speech2TextForConditionalGeneration)):
            return adapter_for(inner, tokenizer)
    has_cross = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    hint = (
        " It has nn.MultiheadAttention modules; name the cross-attention ones"
        if has_cross
        else " It has no nn.MultiheadAttention modules; if it has cross-attention, name those modules"
    )
    raise UnsupportedModelError(
        f"No adapter knows {name}. Supported: WhisperForConditionalGeneration, Speech2TextForConditionalGeneration."
        f"{hint} and wrap it: xl.HookAdapter(model, encoder='encoder', "
        "cross_attention='decoder.layers.*.multihead_attn', decoder_start_id=..., eos_id=...)."
    )
