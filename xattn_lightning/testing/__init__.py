"""Small models for tests, doctests and the demo (no downloads): :class:`TinyS2T`, a tiny
Transformer speech-to-text model with a ready :class:`~xattn_lightning.HookAdapter`.

>>> from xattn_lightning.testing import TinyS2T
>>> TinyS2T(vocab_size=12).adapter(TinyS2T(vocab_size=12)).info.num_layers
2
"""

from xattn_lightning.testing.models import TinyS2T

__all__ = ["TinyS2T"]
