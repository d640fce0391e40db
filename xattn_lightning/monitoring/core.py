"""A monitor, host-independent: :class:`Instrument` composes collecting the probes (:class:`~.collector.ProbeCollector`),
taking readings (:class:`~.reader.Reader`: schedule, budget, mask count) and publishing them
(:class:`~.publisher.Publisher`: scalars, media, messages), and keeps what a resume needs. The Lightning and the
Hugging Face callbacks are hosts over it: they decide *when* (their hooks) and give a :class:`Host`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from xattn_lightning.adapters import Adapter, adapter_for, find_tokenizer
from xattn_lightning.monitoring.collector import IsolatedRng, ProbeCollector
from xattn_lightning.monitoring.config import MonitorConfig
from xattn_lightning.monitoring.history import History
from xattn_lightning.monitoring.messages import Messages
from xattn_lightning.monitoring.publisher import Publisher
from xattn_lightning.monitoring.reader import Reader
from xattn_lightning.monitoring.sharded import guarded_reading
from xattn_lightning.scores import ProbeScores
from xattn_lightning.summary import Summary


class Host(Protocol):
    """What a training framework gives a reading: its processes and where numbers go."""

    @property
    def world_size(self) -> int:
        """How many processes train."""
        ...

    @property
    def rank(self) -> int:
        """This process's rank (0: the one that logs media and prints)."""
        ...

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        ...

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Log scalars where the framework's own metrics go, at ``step`` (called on every process)."""
        ...

    def media_loggers(self) -> list[Any]:
        """W&B loggers for figures and tables (``log_image``/``log_table`` as Lightning's ``WandbLogger``)."""
        ...


class SingleProcess:
    """A :class:`Host` of one process that logs scalars to ``log`` (e.g. ``dict.update``)."""

    world_size = 1
    rank = 0

    def __init__(self, log: Callable[[dict[str, float], int], None] | None = None, media: Sequence[Any] = ()) -> None:
        self._log, self._media = log, list(media)

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """``obj``."""
        return obj

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Hand the scalars to ``log``."""
        if self._log is not None:
            self._log(scalars, step)

    def media_loggers(self) -> list[Any]:
        """The ``media`` given."""
        return self._media


class TorchDistributed:
    """The exchanges of the processes ``torch.distributed`` runs (one process when it is not initialised): what
    the Hugging Face Trainer's host and ``compare`` gather with.

    >>> TorchDistributed().all_gather("x"), TorchDistributed().broadcast(3)
    (['x'], 3)
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.world_size = self._dist.get_world_size() if self._dist else 1
        self.rank = self._dist.get_rank() if self._dist else 0

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        if self._dist is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if self._dist is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out


class Instrument:
    """A monitor's parts and state, shared by its hosts.

    Args:
        config: what to read (:class:`~xattn_lightning.monitoring.config.MonitorConfig`).
        probes_source: the ``probes=`` of the host (``None``: the host collects validation utterances).
        messages: the warning policy (the host's rank-zero printing).
        clock: seconds, for the readings' cost and the overhead budget.
        batch_fn, batch_keys: how a script's batch becomes the model's
            (:class:`~xattn_lightning.monitoring.collector.ProbeCollector`).

    Example:
        >>> import torch
        >>> from xattn_lightning.testing import TinyS2T
        >>> batch = {"input_features": torch.randn(2, 16, 8), "labels": torch.tensor([[1, 5, 6, 7, 2], [1, 6, 5, 8, 2]])}
        >>> inst = Instrument(MonitorConfig(num_probes=2, n_masks=8, targets="labels", log_figures=False,
        ...                                 max_overhead=None), probes_source=[batch])
        >>> logged = {}
        >>> summary = inst.read(SingleProcess(lambda s, step: logged.update(s)), TinyS2T.adapter(TinyS2T()), step=0)
        >>> logged["xattn/num_probes"], "xattn/encoder_spes/pearson" in logged
        (2.0, True)
    """

    def __init__(
        self,
        config: MonitorConfig,
        probes_source: Any = None,
        messages: Messages | None = None,
        clock: Callable[[], float] | None = None,
        batch_fn: Callable[[Any], Any] | str | None = None,
        batch_keys: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.messages = messages or Messages(config.on_error)
        raise_errors = config.on_error == "raise"
        self.collector = ProbeCollector(
            config.num_probes, probes_source, self.messages, batch_fn, batch_keys, raise_errors
        )
        self.reader = Reader(config, self.messages, clock) if clock else Reader(config, self.messages)
        self.publisher = Publisher(config, self.messages, History(config.methods, config.reliability_floor))
        self.last_step = -1
        #: no supported model was found at fit start (said then, with the fix)
        self.model_missing = False
        #: what the last reading's gathered copy of a sharded model cost (``gathered_gb``, ``gather_seconds``)
        self.gather_cost: dict[str, float] = {}
        self._adapter: tuple[int, Adapter] | None = None

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the probes, the schedule, the history and baseline, the fixed mask count, the heads."""
        probes, history = self.collector.probe_set, self.publisher.history
        return {
            "probe_ids": list(probes.ids),
            "probe_positions": list(probes.positions),
            "last_step": self.last_step,
            "history": [dict(h) for h in history.entries],
            "n_masks_frozen": self.reader.masks.frozen,
            "alignment_heads": self.publisher.alignment_heads,
            "baseline": [p.to_dict() for p in history.baseline],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """All or nothing: a state that does not parse leaves the instrument as it was (a fresh start)."""
        restored = (
            list(state.get("probe_ids", [])),
            list(state.get("probe_positions", [])),
            int(state.get("last_step", -1)),
            [dict(h) for h in state.get("history", [])],
            state.get("n_masks_frozen"),
            state.get("alignment_heads"),
            _baseline(state.get("baseline", [])),
        )
        probes, history = self.collector.probe_set, self.publisher.history
        probes.ids, probes.positions, self.last_step, history.entries = restored[:4]
        self.reader.masks.frozen, self.publisher.alignment_heads, history.baseline = restored[4:]

    # ------------------------------------------------------------------ the model
    def adapter(self, target: Any, key: object, tokenizer: object | None = None, *places: Any) -> Adapter:
        """The adapter of ``target`` (a model, a module holding one, or an adapter), resolved once per
        ``key`` (the host's module), with a tokenizer wherever one is found: ``tokenizer``, then
        ``.tokenizer``/``.processor`` on ``places``, the model, or the model's own default."""
        if self._adapter is not None and self._adapter[0] == id(key):
            return self._adapter[1]
        adapter = adapter_for(target, tokenizer)
        if adapter.tokenizer is None:
            adapter.tokenizer = find_tokenizer(*places, adapter.model) or adapter.default_tokenizer()
        self._adapter = (id(key), adapter)
        return adapter

    def forget_adapter(self) -> None:
        """Resolve the adapter again at the next use (a new fit may bring another module)."""
        self._adapter = None

    def check_adapter(self, adapter: Adapter, host_name: str, guessed: bool) -> None:
        """Say now what will make the readings less useful: a model found by guessing, no tokenizer."""
        if adapter.found_at is not None and guessed:
            self.messages.warn_once(
                "found-at",
                f"explaining .{adapter.found_at} ({type(adapter.model).__name__}), the only supported model found on "
                f"{host_name}. If it is not the model being trained (a distillation teacher, say), pass "
                "model_fn=lambda module: <the model or an xl.HookAdapter>.",
            )
        if adapter.tokenizer is None:
            self.messages.warn_once(
                "no-tokenizer",
                "no tokenizer found (as .tokenizer/.processor on the module, its model or the data, nor saved "
                "beside the model): tables and heatmaps will show token ids. Pass tokenizer=... for text.",
            )

    def export_alignment_heads(self, adapter: Adapter) -> None:
        """Write the heads the last reading chose into the model (``export_alignment_heads=True``)."""
        heads = self.publisher.alignment_heads
        if not heads:
            self.messages.warn_once("export", "export_alignment_heads=True but no reading chose heads; the model is unchanged.")
            return
        try:
            where = adapter.set_alignment_heads(heads)
        except NotImplementedError as err:
            self.messages.warn_once("export", f"export_alignment_heads=True but {err}")
            return
        self.messages.info(f"wrote alignment_heads={[list(h) for h in heads]} into {where}.")

    # ------------------------------------------------------------------ the run
    def say_run_end(self) -> None:
        """One message at the end of a run: what the readings cost against training and how many the budget
        thinned; when due readings were not taken, a warning that also says how many, why and the fix."""
        from xattn_lightning.monitoring.budget import thinned_summary

        reader = self.reader
        started = reader.budget.start_time is not None and (reader.budget.runs or reader.skipped_steps)
        cost = thinned_summary(reader.budget, len(reader.skipped_steps)) if started else ""
        missed = reader.end_summary(len(self.publisher.history.entries))
        if missed:
            self.messages.warn_once("end-summary", f"{missed} In all, {cost}" if cost else missed)
        elif cost:
            self.messages.info(cost)

    def read(
        self,
        host: Host,
        adapter: Adapter | Callable[[], Adapter],
        step: int,
        log_step: int | None = None,
        epoch: int | None = None,
    ) -> Summary | None:
        """Read the probes now (every process takes part) and log at ``log_step`` (default ``step``);
        the summary, or ``None`` when nothing could be read (said in a warning). Several processes: every
        exchange is bounded by ``reading_timeout`` and a sharded model (the host's ``root``) is read through
        an unsharded copy (:mod:`xattn_lightning.monitoring.sharded`)."""
        c = self.config
        warn = None if c.on_error == "raise" else self.messages.warn_once
        root = getattr(host, "root", None)
        with guarded_reading(
            host, adapter, root, c.reading_timeout, c.max_gathered_gb, warn, self.reader.clock, c.lockstep
        ) as guarded:
            bounded, resolve, self.gather_cost = guarded
            return self._read(bounded, resolve, step, log_step, epoch)
        return None

    def _read(
        self, host: Host, adapter: Adapter | Callable[[], Adapter], step: int, log_step: int | None, epoch: int | None
    ) -> Summary | None:
        start = self.reader.clock()
        self.last_step = step
        resolve = adapter if callable(adapter) and not isinstance(adapter, Adapter) else lambda: adapter
        with IsolatedRng():
            try:
                probes = self.collector.probes(host, resolve)
            except Exception as err:
                self.collector.problem(err)
                self.reader.skip("no probe utterance could be taken", "see the warning at the start of the run")
                return None
        draw = set(self.collector.probe_set.ids[: c.max_figures]) if (c := self.config).log_figures else set()
        metric = self.reader.read(host, resolve, probes, draw)
        self.publisher.warn_failures(metric.failures)
        if not metric.probes:
            self.reader.skip("every probe failed", "see the warning that names the cause")
            return None
        return self.publisher.publish(host, metric, self.reader.clock() - start, step, log_step, epoch)


def _baseline(stored: list[Any]) -> list[ProbeScores]:
    """The stored baseline's scores; none (the next reading becomes the baseline) where they are in a form this
    version does not read, such as an older checkpoint's flat rows."""
    try:
        return [ProbeScores.from_dict(p) for p in stored]
    except (KeyError, TypeError, AttributeError):
        return []
