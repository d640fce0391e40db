"""What a monitor reads: :class:`MonitorOptions`, the one definition of the options both the Lightning callback
and the Hugging Face Trainer callback take (each field documented here, once, with its one default; both hosts
are dataclasses that inherit these fields as typed keyword-only constructor arguments), and
:class:`MonitorConfig`, the same fields checked, in one typed, validated object shared by every host.

A host builds its :class:`MonitorConfig` from its options (:meth:`MonitorConfig.of`); it is checked once, there,
so a bad argument fails when the callback is made, not at the first reading. It holds the
:class:`~xattn_lightning.reading.ReadingConfig` of its readings (the saliency options inside it), which is
handed on as it is. The schedule (:func:`check_schedule`) is the host's.

Example:
    >>> MonitorConfig(num_probes=2, n_masks=64).reading.saliency.n_masks
    64
    >>> MonitorConfig(metrics=("pearsn",))
    Traceback (most recent call last):
    ...
    xattn_lightning.errors.UnknownNameError: Unknown metric 'pearsn'. Valid metrics are: kendall, pearson, spearman.
"""

# No ``from __future__ import annotations`` here: the hosts' generated ``__init__`` carries these fields' annotations,
# which must be objects (not names of this module) for ``typing.get_type_hints`` and LightningCLI in the hosts' modules.
from collections.abc import Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import Any, Literal, cast

from typing_extensions import Self

from xattn_lightning.errors import XAttnError
from xattn_lightning.functional import RELIABILITY_FLOOR
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec
from xattn_lightning.reading import ReadingConfig
from xattn_lightning.saliency.options import READING_N_MASKS, PerturbationOptions, SaliencyOptions

#: seconds a process waits for the others at one exchange of a reading (several processes), by default
READING_TIMEOUT = 600.0

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


@dataclass(kw_only=True, eq=False)
class MonitorOptions:
    """The reading options of a monitor, the same for every host: both hosts inherit these fields, so each is a
    typed keyword-only argument of their constructors, with the default written here.

    Attributes:
        num_probes: probe utterances read each time (the first of the validation set or of ``probes=``).
        methods: saliency methods (``xl.list_methods()``); ``encoder_spes`` is the paper's SM_H.
        targets: ``"generate"`` (explain the model's own hypothesis) or ``"labels"`` (the batch's labels).
        metrics: correlations logged (``pearson``, ``spearman``, ``kendall``).
        layers, heads: the attention aggregated for the headline (default every layer and head).
        log_figures: heatmaps, the layer × head grid and tables to W&B; max_figures: heatmaps per reading.
        num_beams, max_new_tokens: decoding of ``targets="generate"``.
        max_overhead: readings are thinned (never made noisier) while they cost more than this share of the
            training time (``None``: every due reading is taken).
        reliability_floor: the corrected headline is logged only where the maps' split-half reliability
            reaches it.
        export_alignment_heads: write the heads chosen for word timestamps into the model at the end of the fit.
        on_error: ``"warn"`` (never stop training) or ``"raise"`` (debugging).
        cache_encoder: reuse the probes' encoder outputs while the encoder's weights do not change.
        n_masks: masks per perturbation map; ``"auto"`` chooses a multiple of 256 up to 2,048 from the first
            reading's reliability, then fixes it for the run (kept in checkpoints).
        seed: the masks' seed.
        max_seconds: a time budget for one whole reading: the mask count that fits is calibrated once, then
            fixed (unlike ``xl.explain``'s ``max_seconds``, a cap per method and utterance, which a reading
            never uses).
        saliency_options: any other saliency option by name (``p_h``, ``frame_rate``, ``vocabulary`` ...:
            :class:`~xattn_lightning.saliency.SaliencyOptions`).
        reading_timeout: several processes: seconds a process waits for the others at one step of a reading;
            past it the reading fails on every process together, warned once, and training goes on.
        max_gathered_gb: a sharded model is read through a copy of its full parameters gathered once per
            reading; at most this many GiB, else readings are skipped, said once (``None``: no bound).
        lockstep: several processes: ``True``: every process reads every probe, each forward agreed first, for a
            model whose own forward runs collectives (an ``all_reduce``, hand-written tensor parallelism);
            ``False``: each process reads its share of the probes; ``"auto"``: ``True`` when a forward of the
            first probe runs a collective (``docs/sharding.md``).
    """

    num_probes: int = 8
    methods: Sequence[str] = ("encoder_spes",)
    targets: Literal["generate", "labels"] = "generate"
    metrics: Sequence[str] = ("pearson", "spearman")
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
    n_masks: int | Literal["auto"] = READING_N_MASKS
    seed: int = PerturbationOptions.seed
    max_seconds: float | None = None
    saliency_options: dict[str, Any] | None = None
    reading_timeout: float = READING_TIMEOUT
    max_gathered_gb: float | None = None
    lockstep: bool | Literal["auto"] = "auto"


@dataclass(kw_only=True)
class MonitorConfig(MonitorOptions):
    """:class:`MonitorOptions` checked, once, and made into the reading config they describe; frozen (an option
    changed afterwards would not reach ``reading``). ``methods`` and ``metrics`` are tuples here.

    Attributes:
        reading: the :class:`~xattn_lightning.reading.ReadingConfig` these make (derived, not passed).
    """

    reading: ReadingConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        extra = dict(self.saliency_options or {})
        for name in ("n_masks", "seed", "max_seconds"):
            if name in extra:
                raise XAttnError(f"Pass {name}= itself, not inside saliency_options.")
        if not isinstance(self.num_probes, int) or isinstance(self.num_probes, bool) or self.num_probes < 1:
            raise XAttnError(f"Expected num_probes to be a positive int but got {self.num_probes!r}.")
        if self.on_error not in ("warn", "raise"):
            raise XAttnError(f"Expected on_error 'warn' or 'raise' but got {self.on_error!r}.")
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
        saliency = SaliencyOptions.from_flat(**extra, n_masks=self.n_masks, seed=self.seed)
        methods, metrics = cast(tuple[str, ...], self.methods), cast(tuple[str, ...], self.metrics)
        reading = ReadingConfig(  # it checks methods and metrics and makes them tuples
            methods, metrics, self.layers, self.heads, self.targets, self.num_beams, self.max_new_tokens, saliency
        )
        self.methods, self.metrics, self.saliency_options = reading.methods, reading.metrics, extra
        self.reading = reading  # set last: from here on the config is frozen

    def __setattr__(self, name: str, value: Any) -> None:
        if "reading" in self.__dict__:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    @classmethod
    def of(cls, options: MonitorOptions) -> Self:
        """The checked config of ``options`` (a host, say): every :class:`MonitorOptions` field by its name."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(MonitorOptions)})
