"""``XAttnSaliencyMonitor``: attention–saliency agreement on fixed probe utterances during training."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from xattn_lightning.adapters import Adapter, adapter_for
from xattn_lightning.errors import XAttnError, check_choice
from xattn_lightning.explain import explain
from xattn_lightning.functional.aggregate import HeadSpec, LayerSpec, resolve_layers
from xattn_lightning.saliency import validate_methods
from xattn_lightning.summary import probe_scores, summarize

#: cheap defaults for a training-time monitor (see README "Costs")
MONITOR_DEFAULTS = {"n_masks": 256, "seed": 0}
PREFIX = "xattn/"


def _split_batch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split an HF-style batch dict into one dict per utterance (tensors cloned to CPU)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise XAttnError(f"Cannot split the batch into utterances: tensors have batch sizes {sorted(sizes)}.")
    (n,) = sizes
    out = []
    for i in range(n):
        item: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, Tensor) and v.dim() > 0:
                item[k] = v[i : i + 1].detach().cpu().clone()
            elif isinstance(v, (list, tuple)) and len(v) == n:
                item[k] = [v[i]]
        out.append(item)
    return out


def _merge(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = set(items[0])
    out: dict[str, Any] = {}
    for k in keys:
        vals = [it[k] for it in items]
        if isinstance(vals[0], Tensor):
            if k == "labels":  # labels of different lengths: pad with -100
                width = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=-100) for v in vals]
            out[k] = torch.cat(vals)
        else:
            out[k] = [x for v in vals for x in v]
    return out


class _RngState:
    """Saves and restores every RNG stream the monitor could touch (torch CPU/CUDA, numpy, random)."""

    def __enter__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.np = np.random.get_state()
        self.py = random.getstate()

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.np)
        random.setstate(self.py)


class XAttnSaliencyMonitor(Callback):
    """Tracks how far cross-attention agrees with saliency on fixed probe utterances.

    After validation (never in the sanity check), every ``every_n_epochs`` epochs or
    ``every_n_steps`` optimizer steps, explains the probes with :func:`xattn_lightning.explain`
    and logs under ``xattn/``: agreement per method and metric (full average, per layer, best
    head), the context-mixing gap, saliency coverage and the seconds spent. With a
    ``WandbLogger`` it also logs per-probe heatmaps, a layer × head grid of ρ and a probe table.

    Args:
        every_n_epochs / every_n_steps: schedule, exactly one (default ``every_n_epochs=1``).
        num_probes: validation utterances explained each time (the first ones seen, fixed for
            the whole run and across resumes).
        methods: saliency methods (``xl.list_methods()``).
        targets: ``"generate"`` (the model's hypothesis) or ``"labels"`` (references, teacher forcing).
        probes: optional dataset/dataloader/iterable of batches to take the probes from instead.
        model_fn: ``model_fn(pl_module) -> nn.Module | Adapter``; default: the module itself if
            supported, else its ``.model`` attribute.
        batch_fn: ``batch_fn(batch) -> dict`` in the model's own format (HF convention by default).
        tokenizer: tokenizer/processor for token labels and text.
        metrics: correlations to report (``pearson``, ``spearman``, ``kendall``).
        layers / heads: the aggregation behind the headline ``xattn/<method>/<metric>`` numbers, as in
            :meth:`~xattn_lightning.Explanation.agreement` (``"all"``, ``"last"``, ``"last_2"``, indices);
            per-layer and per-head numbers are always reported too. Default: all layers and heads.
        log_figures: W&B heatmaps and grids (the first ``max_figures`` probes).
        max_overhead: the monitor's time budget as a fraction of the training time since its last run
            (default 0.1: at most ~10 % on top of training). Perturbation methods stop drawing masks
            when the budget is spent (at least one batch each; ``xattn/<method>/n_masks`` says how many
            ran). ``None``: always ``n_masks``. An explicit ``max_seconds`` takes precedence.
        on_error: ``"warn"`` (default: warn once, skip this run, keep training) or ``"raise"``.
        **method_options: same names as :func:`xattn_lightning.explain` (``n_masks``, ``seed``, ``p``,
            ``p_h``, ``batch_size``, ``n_steps`` ...). ``max_seconds`` here is a budget for the whole
            monitor run: it is shared out over the probes and perturbation methods, which stop drawing
            masks when their share is spent (at least one batch each) and report the number used as
            ``xattn/<method>/n_masks``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = XAttnSaliencyMonitor(every_n_epochs=1, num_probes=4, methods=("encoder_spes",))
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        num_probes: int = 8,
        methods: Sequence[str] = ("encoder_spes",),
        targets: str = "generate",
        probes: Any = None,
        model_fn: Callable[[LightningModule], nn.Module | Adapter] | None = None,
        batch_fn: Callable[[Any], Mapping[str, Any]] | None = None,
        tokenizer: object | None = None,
        metrics: Sequence[str] = ("pearson", "spearman"),
        layers: LayerSpec = None,
        heads: HeadSpec = None,
        log_figures: bool = True,
        max_figures: int = 4,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        frame_rate: float = 100.0,
        max_overhead: float | None = 0.1,
        on_error: str = "warn",
        **method_options: Any,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_steps is not None:
            raise XAttnError("Pass exactly one of every_n_epochs and every_n_steps, not both.")
        if every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 1
        for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise XAttnError(f"Expected {name} to be a positive int but got {v!r}.")
        if not isinstance(num_probes, int) or num_probes < 1:
            raise XAttnError(f"Expected num_probes to be a positive int but got {num_probes!r}.")
        check_choice("targets mode", targets, ("generate", "labels"))
        check_choice("on_error mode", on_error, ("warn", "raise"))
        for m in metrics:
            check_choice("metric", m, ("pearson", "spearman", "kendall"))
        validate_methods(methods, method_options)
        if not methods:
            raise XAttnError("Expected at least one saliency method; see xl.list_methods().")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_probes = num_probes
        self.methods = tuple(methods)
        self.targets = targets
        self.probes_source = probes
        self.model_fn = model_fn
        self.batch_fn = batch_fn
        self.tokenizer = tokenizer
        self.metrics = tuple(metrics)
        resolve_layers(layers, 2**16)  # fail on a malformed spec now, not at the first validation
        self.layers = layers
        self.heads = heads
        self.log_figures = log_figures
        self.max_figures = max_figures
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.frame_rate = frame_rate
        self.on_error = on_error
        if max_overhead is not None and not max_overhead > 0:
            raise XAttnError(f"Expected max_overhead > 0 (a fraction of training time) or None, got {max_overhead!r}.")
        self.max_overhead = max_overhead
        self._clock: float | None = None  # end of the last monitor run (or start of training)
        self.method_options = {**MONITOR_DEFAULTS, **method_options}
        # state
        self.probe_ids: list[str] = []
        self.probe_positions: list[int] = []
        self._probe_items: list[dict[str, Any]] = []
        self._seen = 0
        self._last_step = -1
        self.history: list[dict[str, Any]] = []
        self.head_ranking: dict[str, list[tuple[int, int, float]]] = {}
        self.last_explanations: list = []
        self.first_explanations: list = []
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, targets=self.targets)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_ids": list(self.probe_ids),
            "probe_positions": list(self.probe_positions),
            "last_step": self._last_step,
            "history": [{k: v for k, v in h.items()} for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_ids = list(state_dict.get("probe_ids", []))
        self.probe_positions = list(state_dict.get("probe_positions", []))
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ probe collection
    def _wants_more(self) -> bool:
        if self.probe_positions:  # resumed or fixed: collect exactly those positions
            return len(self._probe_items) < len(self.probe_positions)
        return len(self._probe_items) < self.num_probes

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.probes_source is not None or dataloader_idx != 0 or not self._wants_more():
            return
        try:
            items = _split_batch(self._to_model_batch(batch))
        except Exception as err:  # never break validation over probe collection
            self._report(err, "collecting probes")
            return
        self._take(items)

    def _take(self, items: list[dict[str, Any]]) -> None:
        """Keep utterances by their position in the validation stream (stable across epochs/resumes)."""
        have = {p["pos"] for p in self._probe_items}
        for item in items:
            pos = self._seen
            self._seen += 1
            if pos in have or (self.probe_positions and pos not in self.probe_positions):
                continue
            if not self._wants_more():
                break
            self._probe_items.append({"pos": pos, "batch": item})
        self._probe_items.sort(key=lambda p: p["pos"])

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen = 0

    def _to_model_batch(self, batch: Any) -> Mapping[str, Any]:
        if self.batch_fn is not None:
            return self.batch_fn(batch)
        if not isinstance(batch, Mapping):
            raise XAttnError(
                f"The validation batch is a {type(batch).__name__}, not a dict in the HF convention "
                "(input_features, attention_mask, labels); pass batch_fn=... to convert it."
            )
        return batch

    def _collect_from_source(self) -> None:
        src = self.probes_source
        if hasattr(src, "__getitem__") and hasattr(src, "__len__") and not isinstance(src, Mapping):
            it = (src[i] for i in range(len(src)))
        else:
            it = iter(src)
        self._seen = 0
        for batch in it:
            if not self._wants_more():
                break
            b = self._to_model_batch(batch)
            if "input_features" in b and isinstance(b["input_features"], Tensor) and b["input_features"].dim() == 2:
                b = {k: (v.unsqueeze(0) if isinstance(v, Tensor) else [v]) for k, v in b.items()}
            self._take(_split_batch(b))

    # ------------------------------------------------------------------ schedule
    def _should_run(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return False
        if self.every_n_epochs is not None:
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0 and trainer.global_step != self._last_step
        step = trainer.global_step
        if self._last_step < 0:
            return step >= self.every_n_steps
        return step - self._last_step >= self.every_n_steps

    # ------------------------------------------------------------------ main
    def _model(self, pl_module: LightningModule) -> Adapter:
        if self.model_fn is not None:
            return adapter_for(self.model_fn(pl_module), self.tokenizer)
        adapter = getattr(pl_module, "xattn_adapter", None)
        if isinstance(adapter, Adapter):
            return adapter_for(adapter, self.tokenizer)
        try:
            return adapter_for(pl_module, self.tokenizer)
        except XAttnError:
            for attr in ("model", "net", "module", "s2t"):
                inner = getattr(pl_module, attr, None)
                if isinstance(inner, (nn.Module, Adapter)):
                    try:
                        return adapter_for(inner, self.tokenizer)
                    except XAttnError:
                        continue
            raise

    def _report(self, err: BaseException, where: str, key: str | None = None) -> None:
        if self.on_error == "raise":
            raise err
        key = key or f"{where}:{type(err).__name__}:{err}"
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(
                f"XAttnSaliencyMonitor: {where} failed and was skipped ({type(err).__name__}: {err}). "
                "Training continues; pass on_error='raise' to debug."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from xattn_lightning.loggers import offline_sync_hint

        for lg in trainer.loggers:
            try:
                hint = offline_sync_hint(lg)
            except Exception:  # never fail the end of training over a hint
                hint = None
            if hint:
                rank_zero_info(f"XAttnSaliencyMonitor: the W&B run was logged offline; upload it with: {hint}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_run(trainer):
            return
        try:
            self.run(trainer, pl_module)
        finally:
            if self._clock is not None:  # the next budget counts training time from here
                self._clock = time.perf_counter()

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """Explain the probes now and log; returns the summary (``None`` when skipped)."""
        start = time.perf_counter()
        self._last_step = trainer.global_step
        rows: list[dict[str, Any]] = []
        errors: list[tuple[str, str]] = []  # (probe id or "", cause)
        exps_local: list = []
        with _RngState():
            try:
                if self.probes_source is not None and not self._probe_items:
                    self._collect_from_source()
                if not self._probe_items:
                    raise XAttnError("No probe utterances were collected from the validation data.")
                if len(self._probe_items) < self.num_probes and not self.probe_positions:
                    if "few" not in self._warned:
                        self._warned.add("few")
                        rank_zero_warn(
                            f"XAttnSaliencyMonitor: only {len(self._probe_items)} probe utterances available "
                            f"(num_probes={self.num_probes}); using those."
                        )
                if not self.probe_positions:
                    self.probe_positions = [p["pos"] for p in self._probe_items]
                    self.probe_ids = [self._probe_id(p) for p in self._probe_items]
                adapter = self._model(pl_module)
                world, rank = trainer.world_size, trainer.global_rank
                mine = self._probe_items[rank::world]
                options = dict(self.method_options)
                budget = options.pop("max_seconds", None)
                if budget is None and self.max_overhead is not None and self._clock is not None:
                    budget = self.max_overhead * (start - self._clock)
                for n_done, p in enumerate(mine):
                    try:
                        if budget is not None:  # the rest of the run's budget, shared by the probes and methods left
                            left = budget - (time.perf_counter() - start)
                            options["max_seconds"] = max(0.0, left) / (len(mine) - n_done) / len(self.methods)
                        (e,) = explain(
                            adapter,
                            p["batch"],
                            targets=self.targets,
                            methods=self.methods,
                            num_beams=self.num_beams,
                            max_new_tokens=self.max_new_tokens,
                            **options,
                        )
                        row = probe_scores(e, self.methods, self.metrics, self.layers, self.heads)
                        row["id"] = self._probe_id(p)
                        row["text"] = self._ref_text(p, adapter)
                        row["hypothesis"] = e.text or " ".join(e.tokens or [])
                        rows.append(row)
                        exps_local.append((row["id"], e))
                    except Exception as err:  # one bad probe does not cost the others
                        if self.on_error == "raise":
                            raise
                        errors.append((self._probe_id(p), f"{type(err).__name__}: {err}"))
            except Exception as err:
                if self.on_error == "raise":
                    raise
                errors.append(("", f"{type(err).__name__}: {err}"))
        rows, errors, exps = self._gather(trainer, rows, errors, exps_local)
        by_cause: dict[str, list[str]] = {}
        for pid, cause in errors:
            by_cause.setdefault(cause, []).append(pid)
        for cause, pids in by_cause.items():  # one warning per cause, naming the probes it hit
            named = [p for p in pids if p]
            where = f"explaining probes {', '.join(named)}" if named else "explaining probes"
            self._report(RuntimeError(cause), where, key=cause)
        if not rows:
            return None
        try:
            summary = summarize(rows, self.methods, self.metrics)
        except Exception as err:
            self._report(err, "summarizing")
            return None
        seconds = time.perf_counter() - start
        scalars = {PREFIX + k: v for k, v in summary["scalars"].items() if not math.isnan(v)}
        scalars[PREFIX + "seconds"] = seconds
        scalars[PREFIX + "num_probes"] = float(len(rows))
        scalars[PREFIX + "num_failed"] = float(len(errors))
        self.head_ranking = summary["head_ranking"]
        self.last_explanations = [e for _, e in exps]
        if not self.history:
            self.first_explanations = list(self.last_explanations)
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **scalars})
        self._log_scalars(trainer, pl_module, scalars)
        if trainer.is_global_zero:
            self._log_media(trainer, rows, exps, summary)
            best = {m: f"layer {r[0][0]} head {r[0][1]} (rho={r[0][2]:.3f})" for m, r in self.head_ranking.items() if r}
            rank_zero_info(f"XAttnSaliencyMonitor step {trainer.global_step}: best head {best}")
        return summary

    def _probe_id(self, p: dict[str, Any]) -> str:
        for key in ("id", "ids", "utt_id"):
            v = p["batch"].get(key)
            if isinstance(v, list) and v:
                return str(v[0])
        return f"val{p['pos']}"

    def _ref_text(self, p: dict[str, Any], adapter: Adapter) -> str:
        v = p["batch"].get("text")
        if isinstance(v, list) and v:
            return str(v[0])
        labels = p["batch"].get("labels")
        if isinstance(labels, Tensor):
            return adapter.decode_text(adapter.normalize_target(labels[0])[1:]) or ""
        return ""

    def _gather(self, trainer: Trainer, rows: list, errors: list, exps: list) -> tuple[list, list, list]:
        """All ranks take part (no collective inside rank-zero-only code); every rank gets all rows."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return rows, errors, exps
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, (rows, errors, exps))
        all_rows, all_err, all_exps = [], [], []
        for r, er, ex in gathered:
            all_rows += r
            all_err += er
            all_exps += ex
        order = {pid: i for i, pid in enumerate(self.probe_ids)}
        all_rows.sort(key=lambda r: order.get(r["id"], 0))
        all_exps.sort(key=lambda x: order.get(x[0], 0))
        return all_rows, all_err, all_exps

    def _log_scalars(self, trainer: Trainer, pl_module: LightningModule, scalars: dict[str, float]) -> None:
        for logger in trainer.loggers:
            try:
                logger.log_metrics(scalars, step=trainer.global_step)
            except Exception as err:
                self._report(err, f"logging scalars to {type(logger).__name__}")

    def _log_media(self, trainer: Trainer, rows: list, exps: list, summary: dict) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers or not self.log_figures:
            return
        try:
            import wandb

            from xattn_lightning.viz import figure_to_array, grid_figure, heatmap_figure

            step = trainer.global_step
            images = {}
            for pid, e in exps[: self.max_figures]:
                fig = heatmap_figure(e, self.methods, title=f"{pid} @ step {step}", frame_rate=self.frame_rate)
                images[pid] = figure_to_array(fig)
            grids = {
                m: figure_to_array(grid_figure(g, f"ρ(CA, {m}) per layer × head")) for m, g in summary["grids"].items()
            }
            columns = (
                ["id", "text", "hypothesis"] + [f"{m}/{k}" for m in self.methods for k in self.metrics] + ["image"]
            )
            data = []
            for r in rows:
                img = wandb.Image(images[r["id"]]) if r["id"] in images else None
                data.append(
                    [r["id"], r["text"], r["hypothesis"]]
                    + [r[f"{m}/{k}"] for m in self.methods for k in self.metrics]
                    + [img]
                )
            ranking_cols = ["method", "rank", "layer", "head", "rho"]
            ranking = [
                [m, i + 1, li, hi, rho] for m, rk in self.head_ranking.items() for i, (li, hi, rho) in enumerate(rk)
            ]
            for lg in wandb_loggers:
                if images:
                    lg.log_image(PREFIX + "heatmaps", list(images.values()), step=step, caption=list(images))
                lg.log_image(PREFIX + "head_grid", list(grids.values()), step=step, caption=list(grids))
                lg.log_table(PREFIX + "probes", columns=columns, data=data, step=step)
                lg.log_table(PREFIX + "head_ranking", columns=ranking_cols, data=ranking, step=step)
        except Exception as err:
            self._report(err, "logging figures/tables to W&B")
