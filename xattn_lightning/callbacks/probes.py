"""Moved: the probe set is :mod:`xattn_lightning.monitoring.probes` (shared by every host of the monitor)."""

import warnings

from xattn_lightning.monitoring.probes import ProbeSet, as_batch, split_batch

warnings.warn(
    "xattn_lightning.callbacks.probes moved to xattn_lightning.monitoring.probes; import it from there.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["ProbeSet", "as_batch", "split_batch"]
