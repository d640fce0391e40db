"""The monitor without a training framework: what a reading is, its options, its state and its messages.

Hosts (:class:`xattn_lightning.XAttnSaliencyMonitor` for Lightning,
:class:`xattn_lightning.integrations.transformers.XAttnSaliencyCallback` for the Hugging Face Trainer)
decide when to read and give a :class:`Host`; :class:`Instrument` does the rest, in three parts: the
:class:`ProbeCollector`, the :class:`Reader` and the :class:`Publisher`.
"""

from xattn_lightning.monitoring.budget import OverheadBudget
from xattn_lightning.monitoring.collector import ProbeCollector
from xattn_lightning.monitoring.config import PREFIX, MonitorConfig, MonitorOptions, check_probes_source, check_schedule
from xattn_lightning.monitoring.core import Host, Instrument, SingleProcess
from xattn_lightning.monitoring.history import History
from xattn_lightning.monitoring.masks import MaskCount
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.monitoring.publisher import Publisher
from xattn_lightning.monitoring.reader import Reader
from xattn_lightning.monitoring.views import InstrumentViews

__all__ = [
    "PREFIX",
    "History",
    "Host",
    "Instrument",
    "InstrumentViews",
    "MaskCount",
    "Messages",
    "MonitorConfig",
    "MonitorOptions",
    "OverheadBudget",
    "ProbeCollector",
    "Publisher",
    "Reader",
    "SingleProcess",
    "check_probes_source",
    "check_schedule",
]
