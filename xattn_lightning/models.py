"""Deprecated: :class:`TinyS2T` moved to :mod:`xattn_lightning.testing`."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "TinyS2T":
        warnings.warn(
            "xattn_lightning.models.TinyS2T moved to xattn_lightning.testing.TinyS2T; import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        from xattn_lightning.testing import TinyS2T

        return TinyS2T
    raise AttributeError(f"module 'xattn_lightning.models' has no attribute {name!r}")
