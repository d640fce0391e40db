"""Adapters: the only code that knows a model family."""

from __future__ import annotations

from torch import nn

from xattn_lightning.adapters.base import Adapter, uncompiled, unwrap_tokenizer
from xattn_lightning.adapters.hf_speech2text import Speech2TextAdapter
from xattn_lightning.adapters.hf_whisper import WhisperAdapter
from xattn_lightning.adapters.hooks import HookAdapter
from xattn_lightning.adapters.openai_whisper import OpenAIWhisperAdapter
from xattn_lightning.adapters.records import AdapterInfo, ForwardOutput, Utterance
from xattn_lightning.errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "AdapterInfo",
    "ForwardOutput",
    "HookAdapter",
    "OpenAIWhisperAdapter",
    "Speech2TextAdapter",
    "Utterance",
    "WhisperAdapter",
    "adapter_for",
    "find_tokenizer",
    "is_tokenizer",
    "uncompiled",
]


#: attributes of a wrapper (a LightningModule, say) searched for the model it trains, in this order
INNER_MODEL_ATTRS: tuple[str, ...] = ("model", "net", "module", "s2t", "whisper", "asr")


#: attributes searched for a tokenizer or processor (training scripts keep one as ``self.processor``)
TOKENIZER_ATTRS: tuple[str, ...] = ("tokenizer", "processor")


def is_tokenizer(obj: object) -> bool:
    """True for something that turns token ids into text: a tokenizer, a processor that wraps one,
    openai-whisper's tokenizer (a bare feature extractor is not).

    >>> is_tokenizer(None), is_tokenizer(object())
    (False, False)
    """
    if obj is None:
        return False
    inner = unwrap_tokenizer(obj)
    return callable(getattr(inner, "decode", None)) or callable(getattr(inner, "convert_ids_to_tokens", None))


def find_tokenizer(*owners: object) -> object | None:
    """The first tokenizer or processor found as a ``.tokenizer``/``.processor`` attribute of
    ``owners`` (a LightningModule, its model, a DataModule ...), or ``None``.

    >>> class Module: processor = None
    >>> find_tokenizer(Module(), None) is None
    True
    """
    for owner in owners:
        if owner is None:
            continue
        for attr in TOKENIZER_ATTRS:
            try:
                tok = getattr(owner, attr, None)
            except Exception:  # a property that fails (e.g. a DataModule not set up) is no tokenizer
                continue
            if is_tokenizer(tok):
                return tok
    return None


def _direct_adapter(model: nn.Module, tokenizer: object | None) -> Adapter | None:
    from xattn_lightning.adapters.openai_whisper import OpenAIWhisperAdapter, is_openai_whisper

    try:
        from transformers import Speech2TextForConditionalGeneration, WhisperForConditionalGeneration
    except ImportError:  # pragma: no cover - transformers is a dependency
        WhisperForConditionalGeneration = Speech2TextForConditionalGeneration = ()  # type: ignore[assignment,misc]
    if isinstance(model, WhisperForConditionalGeneration):
        return WhisperAdapter(model, tokenizer)
    if isinstance(model, Speech2TextForConditionalGeneration):
        return Speech2TextAdapter(model, tokenizer)
    if is_openai_whisper(model):
        return OpenAIWhisperAdapter(model, tokenizer)
    from xattn_lightning.adapters.nemo import NemoAEDAdapter, is_nemo_aed

    if is_nemo_aed(model):
        return NemoAEDAdapter(model, tokenizer)
    return None


#: how many wrappers deep :func:`adapter_for` looks (a LightningModule's ``.model`` that is a PEFT
#: ``PeftModel`` whose ``.model`` is the LoRA-injected Whisper: 2)
INNER_MODEL_DEPTH = 3


def _inner_adapter(model: nn.Module, tokenizer: object | None, depth: int) -> Adapter | None:
    """An adapter for a supported model found through :data:`INNER_MODEL_ATTRS`, breadth first,
    at most ``depth`` wrappers deep (the model itself is not tried)."""
    level, seen = [model], {id(model)}
    for _ in range(depth):
        found_next = []
        for owner in level:
            for attr in INNER_MODEL_ATTRS:
                try:
                    inner = uncompiled(getattr(owner, attr, None))
                except Exception:  # a property that fails is no model
                    continue
                if isinstance(inner, Adapter):
                    return adapter_for(inner, tokenizer)
                if isinstance(inner, nn.Module) and id(inner) not in seen:
                    seen.add(id(inner))
                    adapter = _direct_adapter(inner, tokenizer)
                    if adapter is not None:
                        return adapter
                    found_next.append(inner)
        level = found_next
    return None


def _supported_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` that an adapter knows, with their dotted names."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if _direct_adapter(sub, None) is not None:
            found.append((name, sub))
    return found


def adapter_for(model: nn.Module | Adapter, tokenizer: object | None = None) -> Adapter:
    """Pick the adapter for ``model`` (an adapter is returned as it is).

    Knows Hugging Face ``WhisperForConditionalGeneration`` and ``Speech2TextForConditionalGeneration``
    and openai-whisper's ``whisper.model.Whisper``, given directly or as an attribute of a wrapper
    (:data:`INNER_MODEL_ATTRS`, e.g. a LightningModule's ``.model``, up to :data:`INNER_MODEL_DEPTH`
    wrappers deep: a PEFT/LoRA ``PeftModel`` there is looked through), or an adapter at
    ``.xattn_adapter``, or else the one supported submodule under any name (several: an error that
    names them); a ``torch.compile``-d model (at either place) is explained through the eager
    module it wraps (:func:`uncompiled`).

    >>> adapter_for(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.UnsupportedModelError: No adapter knows Linear...
    """
    if isinstance(model, Adapter):
        if tokenizer is not None and model.tokenizer is None:
            model.tokenizer = tokenizer
        return model
    module: nn.Module = uncompiled(model)
    name = type(module).__name__
    found = _direct_adapter(module, tokenizer)
    if found is not None:
        return found
    inner = getattr(module, "xattn_adapter", None)
    if isinstance(inner, Adapter):
        return adapter_for(inner, tokenizer)
    found = _inner_adapter(module, tokenizer, INNER_MODEL_DEPTH)
    if found is not None:
        return found
    subs = _supported_submodules(module) if isinstance(module, nn.Module) else []
    if len(subs) == 1:  # under another name (self.backbone = WhisperForConditionalGeneration...)
        adapter = _direct_adapter(subs[0][1], tokenizer)
        assert adapter is not None
        adapter.found_at = subs[0][0]
        return adapter
    if len(subs) > 1:
        names = ", ".join(f".{n} ({type(m).__name__})" for n, m in subs)
        raise UnsupportedModelError(
            f"{name} holds {len(subs)} supported models: {names}; which one to explain is not clear. Pass "
            f"model_fn=lambda module: module.{subs[0][0]} to the monitor (or that module to xl.explain)."
        )
    has_cross = isinstance(module, nn.Module) and any(isinstance(m, nn.MultiheadAttention) for m in module.modules())
    hint = (
        " It has nn.MultiheadAttention modules; name the cross-attention ones"
        if has_cross
        else " It has no nn.MultiheadAttention modules; if it has cross-attention, name those modules"
    )
    raise UnsupportedModelError(
        f"No adapter knows {name}. Supported: WhisperForConditionalGeneration, Speech2TextForConditionalGeneration, "
        f"openai-whisper's Whisper (also as a .{'/.'.join(INNER_MODEL_ATTRS)} attribute).{hint} and wrap it: "
        "xl.HookAdapter(model, encoder='encoder', cross_attention='decoder.layers.*.multihead_attn', "
        "decoder_start_id=..., eos_id=...), then pass model_fn=lambda module: that_adapter to the monitor."
    )
