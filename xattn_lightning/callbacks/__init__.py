"""Lightning callbacks."""

from xattn_lightning.callbacks.monitor import XAttnSaliencyMonitor

__all__ = ["XAttnSaliencyMonitor"]
