"""What a monitor reads, in one typed, validated object shared by every host.

The Lightning callback and the Hugging Face Trainer callback build a :class:`MonitorConfig` from their
constructor arguments; it is checked once, there, so a bad argument fails when the callback is made,
not at the first reading. The schedule (:func:`check_schedule`) is the host's.

Example:
    >>> MonitorConfig(num_probes=2, n_masks=64).method_options["n_masks"]
    64
    >>> MonitorConfig(metrics=("pearsn",))
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.UnknownNameError: Unknown metric 'pearsn'. Valid metrics are: kendall, pearson, spearman.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.functional import RELIABILITY_FLOOR
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec, resolve_layers
from xattn_lightning.saliency import validate_methods
from xattn_lightning.saliency.options import READING_DEFAULTS

#: seconds a process waits for the others at one exchange of a reading (several processes), by default
READING_TIMEOUT = 600.0

METRICS: tuple[str, ...] = ("pearson", "spearman", "kendall")
PREFIX = "xattn/"


def check_schedule(every_n_epochs: int | None, every_n_steps: int | None) -> int | None:
    """``every_n_epochs`` (1 when neither is given), after checking that at most one is given and each is
    a positive int.

    >>> check_schedule(None, None), check_schedule(None, 50)
    (1, None)
    """
    if every_n_epochs is not None and every_n_steps is not None:
        raise XAttnError("Pass exactly one of every_n_epochs and every_n_steps, not both.")
    if every_n_epochs is None and every_n_steps is None:
        every_n_epochs = 1
    for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise XAttnError(f"Expected {name} to be a positive int but got {v!r}.")
    return every_n_epochs


def check_probes_source(probes: Any) -> None:
    """Fail on a ``probes=`` that cannot be a source of utterances (a string, a single batch dict)."""
    if probes is not None and isinstance(probes, (str, bytes, Mapping)):
        raise XAttnError(
            f"Expected probes= to be a DataLoader, a Dataset or a list of batches but got a "
            f"{type(probes).__name__}; wrap a single batch in a list: probes=[batch]."
        )


@dataclass(frozen=True)
class MonitorConfig:
    """The reading options of a monitor (the hosts' constructor arguments of the same names document them).

    ``n_masks``, ``seed`` and ``max_seconds`` are the mask options a monitor user sets most; any other
    :func:`xattn_lightning.explain` option goes in ``saliency_options``. :attr:`method_options` merges
    them, with the reading defaults (:data:`~xattn_lightning.saliency.options.READING_DEFAULTS`).
    """

    num_probes: int = 8
    methods: tuple[str, ...] = ("encoder_spes",)
    targets: Literal["generate", "labels"] = "generate"
    metrics: tuple[str, ...] = ("pearson", "spearman")
    layers: LayerSpec = None
    heads: HeadSpec = None
    log_figures: bool = True
    max_figures: int = 4
    num_beams: int = 1
    max_new_tokens: int | None = None
    max_overhead: float | None = 0.1
    reliability_floor: float = RELIABILITY_FLOOR
    export_alignment_heads: bool = False
    on_error: Literal["warn", "raise"] = "warn"
    cache_encoder: bool = True
    n_masks: int | Literal["auto"] = READING_DEFAULTS["n_masks"]
    seed: int = READING_DEFAULTS["seed"]
    max_seconds: float | None = None
    saliency_options: Mapping[str, Any] = field(default_factory=dict)
    reading_timeout: float = READING_TIMEOUT
    max_gathered_gb: float | None = None
    lockstep: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods) if not isinstance(self.methods, str) else self.methods)
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "saliency_options", dict(self.saliency_options or {}))
        if not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise XAttnError(f"Expected num_probes to be a positive int but got {self.num_probes!r}.")
        check_choice("targets mode", self.targets, ("generate", "labels"))
        check_choice("on_error mode", self.on_error, ("warn", "raise"))
        for m in self.metrics:
            check_choice("metric", m, METRICS)
        for name in ("n_masks", "seed", "max_seconds"):
            if name in self.saliency_options:
                raise XAttnError(f"Pass {name}= itself, not inside saliency_options.")
        validate_methods(self.methods, self.method_options)
        if not self.methods:
            raise XAttnError("Expected at least one saliency method; see xl.list_methods().")
        n = self.n_masks
        if n != "auto" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise XAttnError(f"Expected n_masks to be a positive int or 'auto' but got {n!r}.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise XAttnError(
                f"Expected max_seconds > 0 (seconds for a whole reading) or None, got {self.max_seconds!r}."
            )
        if self.max_overhead is not None and not self.max_overhead > 0:
            raise XAttnError(
                f"Expected max_overhead > 0 (a fraction of training time) or None, got {self.max_overhead!r}."
            )
        if not self.reading_timeout > 0 or (self.max_gathered_gb is not None and not self.max_gathered_gb > 0):
            raise XAttnError(
                f"Expected reading_timeout > 0 (seconds) and max_gathered_gb > 0 (GiB) or None, got "
                f"{self.reading_timeout!r} and {self.max_gathered_gb!r}."
            )
        if self.lockstep not in (True, False, "auto"):
            raise XAttnError(f"Expected lockstep to be True, False or 'auto' (docs/sharding.md) but got {self.lockstep!r}.")
        resolve_layers(self.layers, 2**16)  # a malformed spec fails now

    @property
    def method_options(self) -> dict[str, Any]:
        """Every explain option of a reading, by name (``max_seconds`` included when set)."""
        out = {**self.saliency_options, "n_masks": self.n_masks, "seed": self.seed}
        if self.max_seconds is not None:
            out["max_seconds"] = self.max_seconds
        return out

    @property
    def frame_rate(self) -> float | None:
        """Input frames per second when set (``saliency_options={"frame_rate": ...}``): SPES segmentation, word
        timestamps and the figures' seconds axis; ``None``: the model's own (``Adapter.frame_rate``)."""
        rate = self.saliency_options.get("frame_rate")
        return None if rate is None else float(rate)

    @classmethod
    def from_flat(cls, method_options: Mapping[str, Any] | None = None, **kwargs: Any) -> MonitorConfig:
        """The config from the hosts' flat keyword options (``n_masks=...``, ``p_h=...``): the mask
        options go to their fields, the others to ``saliency_options``."""
        flat = dict(method_options or {})
        own = {k: flat.pop(k) for k in ("n_masks", "seed", "max_seconds") if k in flat}
        merged = {**dict(kwargs.pop("saliency_options", None) or {}), **flat}
        return cls(**kwargs, **own, saliency_options=merged)
