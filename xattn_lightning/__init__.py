"""xattn_lightning: can you trust your speech model's cross-attention as an explanation?

>>> import xattn_lightning as xl
>>> "spes" in xl.list_methods()
True
"""

from typing import TYPE_CHECKING, Any

from xattn_lightning import timestamps
from xattn_lightning.adapters import (
    Adapter,
    HookAdapter,
    OpenAIWhisperAdapter,
    Speech2TextAdapter,
    WhisperAdapter,
    adapter_for,
)
from xattn_lightning.encoder_cache import EncoderCache
from xattn_lightning.errors import UnknownNameError, UnsupportedModelError, XAttnError
from xattn_lightning.explain import Explanation, corpus_agreement, explain
from xattn_lightning.saliency import SaliencyOptions, SaliencyResult, list_methods
from xattn_lightning.timestamps import AlignmentLoss, alignment_heads, audio_word_timestamps, word_timestamps

if TYPE_CHECKING:  # pragma: no cover
    from xattn_lightning import loggers
    from xattn_lightning.callbacks import XAttnSaliencyMonitor

try:  # the version lives in pyproject.toml only
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("xattn_lightning")
except PackageNotFoundError:  # pragma: no cover - run from a source tree that was never installed
    __version__ = "0+unknown"

#: names that import Lightning: loaded on first use, so the library API stands without it
_LAZY = {"XAttnSaliencyMonitor": "xattn_lightning.callbacks", "loggers": "xattn_lightning.loggers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if name == "loggers" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xattn_lightning' has no attribute {name!r}")


__all__ = [
    "AlignmentLoss",
    "Adapter",
    "EncoderCache",
    "Explanation",
    "HookAdapter",
    "OpenAIWhisperAdapter",
    "SaliencyOptions",
    "SaliencyResult",
    "Speech2TextAdapter",
    "UnknownNameError",
    "UnsupportedModelError",
    "WhisperAdapter",
    "XAttnSaliencyMonitor",
    "XAttnError",
    "adapter_for",
    "alignment_heads",
    "corpus_agreement",
    "explain",
    "list_methods",
    "loggers",
    "timestamps",
    "word_timestamps",
    "audio_word_timestamps",
]
