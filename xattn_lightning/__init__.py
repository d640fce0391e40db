"""xattn_lightning: can you trust your speech model's cross-attention as an explanation?

>>> import xattn_lightning as xl
>>> "spes" in xl.list_methods()
True
"""

from xattn_lightning import loggers  # noqa: E402  (xl.loggers.wandb_logger)
from xattn_lightning.adapters import (
    Adapter,
    HookAdapter,
    Speech2TextAdapter,
    WhisperAdapter,
    adapter_for,
)
from xattn_lightning.callbacks import XAttnSaliencyMonitor
from xattn_lightning.errors import UnknownNameError, UnsupportedModelError, XAttnError
from xattn_lightning.explain import Explanation, corpus_agreement, explain
from xattn_lightning.saliency import list_methods

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Explanation",
    "HookAdapter",
    "Speech2TextAdapter",
    "UnknownNameError",
    "UnsupportedModelError",
    "WhisperAdapter",
    "XAttnSaliencyMonitor",
    "XAttnError",
    "adapter_for",
    "corpus_agreement",
    "explain",
    "list_methods",
    "loggers",
]
