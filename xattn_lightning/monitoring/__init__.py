"""The monitor without a training framework: what a reading is, its options, its state and its messages.

Hosts (:class:`xattn_lightning.XAttnSaliencyMonitor` for Lightning,
:class:`xattn_lightning.integrations.transformers.XAttnSaliencyCallback` for the Hugging Face Trainer)
decide when to read and give a :class:`Host`; :class:`Instrument` does the rest.
"""

from xattn_lightning.monitoring.budget import OverheadBudget
from xattn_lightning.monitoring.config import PREFIX, MonitorConfig, check_probes_source, check_schedule
from xattn_lightning.monitoring.core import Host, Instrument, Share, SingleProcess
from xattn_lightning.monitoring.history import History
from xattn_lightning.monitoring.masks import MaskCount
from xattn_lightning.monitoring.messages import Messages

__all__ = [
    "PREFIX",
    "History",
    "Host",
    "Instrument",
    "MaskCount",
    "Messages",
    "MonitorConfig",
    "OverheadBudget",
    "Share",
    "SingleProcess",
    "check_probes_source",
    "check_schedule",
]
