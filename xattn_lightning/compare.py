"""Comparing checkpoints: the same probe utterances through several models, side by side.

``compare_checkpoints`` runs each checkpoint through a Lightning ``Trainer.predict`` over the probe
set (so ``devices``/``num_nodes``/``strategy`` spread the work with Lightning's own DDP), computes
agreement per method, layer and head, the WER of each checkpoint on the probes, and returns a
:class:`~xattn_lightning.compare_report.Comparison`, which :func:`~xattn_lightning.compare_report.write_comparison`
saves as CSV, JSON and figures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xattn_lightning.adapters import Adapter, adapter_for, is_tokenizer, unwrap_tokenizer
from xattn_lightning.audio import ManifestRow
from xattn_lightning.batches import ID_KEYS, leaves
from xattn_lightning.checkpoints import load_checkpoint
from xattn_lightning.compare_report import CheckpointResult, Comparison
from xattn_lightning.errors import XAttnError
from xattn_lightning.explain import Explanation
from xattn_lightning.functional import AUTO_RELIABILITY_TARGET, MASK_LADDER
from xattn_lightning.loading import features_batch
from xattn_lightning.monitoring.core import TorchDistributed
from xattn_lightning.monitoring.masks import MaskCount
from xattn_lightning.monitoring.probes import split_batch
from xattn_lightning.reading import Probe, ReadingConfig, read
from xattn_lightning.saliency.options import READING_N_MASKS, SaliencyOptions
from xattn_lightning.summary import ReadingMetric, Summary
from xattn_lightning.text import wer


# ---------------------------------------------------------------------------- running
class _Rows(Dataset):
    def __init__(self, rows: Sequence[ManifestRow | Any]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, ManifestRow]:
        return i, self.rows[i]


class _ExplainerModule(pl.LightningModule):
    """``predict_step`` explains a batch of manifest rows (collected in ``outputs``)."""

    def __init__(
        self, model: Any, processor: Any, config: ReadingConfig, resume: dict[str, Explanation] | None = None
    ) -> None:
        super().__init__()
        self.resume = resume
        self.inner = model if isinstance(model, nn.Module) else None
        self.tokenizer = _tokenizer_of(processor)
        self.adapter = adapter_for(model, self.tokenizer)
        self.processor = processor
        self.config = config
        self.metric = ReadingMetric(config.methods, config.metrics)
        self.metric.add_state("explained", [], "cat")  # (position, id, explanation)

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        idx, rows = batch
        probes = []
        for i, r in zip(idx, rows):
            if isinstance(r, ManifestRow):
                feats = features_batch(self.processor, [r])
                probe = Probe(position=int(i), id=r.id, batch=feats, text=r.text)
            else:  # a probe batch in any layout the monitor reads
                probe = _batch_probe(int(i), self.adapter.model_batch(r))
            feats = {k: v.to(self.adapter.device) if isinstance(v, torch.Tensor) else v for k, v in probe.batch.items()}
            probes.append(dataclasses.replace(probe, batch=feats))
        # a bad probe costs only itself
        reading = read(self.adapter, probes, self.config, catch=(XAttnError,), resume=self.resume)
        failures = [dataclasses.replace(f, cause=f.cause.removeprefix("XAttnError: ")) for f in reading.failures]
        self.metric.update(reading.scores, failures)
        self.metric.explained += [(r.probe.position, r.probe.id, r.explanation) for r in reading.results]  # type: ignore[attr-defined]


def _wer(summary: Summary, explanations: Sequence[Explanation]) -> float:
    """WER of the hypotheses on the probes (``nan`` without a tokenizer to turn ids into text)."""
    if any(e.text is None for e in explanations):
        return math.nan
    return wer([p.text for p in summary.probes], [e.text or "" for e in explanations])


def _probe_id(position: int, row: Any) -> str:
    """A probe's id: its manifest id, or a batch's own id (``id``, ``ids``...), else ``probe<position>``."""
    if isinstance(row, ManifestRow):
        return row.id
    for leaf in leaves(row):
        if leaf.name in ID_KEYS and isinstance(leaf.value, (list, tuple)) and len(leaf.value) == 1:
            return str(leaf.value[0])
    return f"probe{position}"


def _batch_probe(position: int, batch: dict[str, Any]) -> Probe:
    """The probe of a one-utterance batch given to ``compare`` instead of a manifest row."""
    items = split_batch(batch)
    if len(items) != 1:
        raise XAttnError(
            f"compare takes probe batches of one utterance each, but probe {position} holds {len(items)}; "
            "give them one per entry (e.g. a DataLoader with batch_size=1, or a manifest)."
        )
    return dataclasses.replace(Probe.from_batch(position, items[0], ""), id=_probe_id(position, batch))


def _tokenizer_of(processor: Any) -> Any:
    """The tokenizer inside a processor (a bare feature extractor has none)."""
    return unwrap_tokenizer(processor) if is_tokenizer(processor) else None


def _collate(items: list) -> tuple[list[int], list[ManifestRow]]:
    return [i for i, _ in items], [r for _, r in items]


def _once(items: list, position: Callable[[Any], int]) -> list:
    """Each probe once, in probe order (the distributed sampler repeats items to even out the ranks)."""
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(position(item), item)
    return [seen[k] for k in sorted(seen)]


def compare_checkpoints(
    checkpoints: Sequence[str | nn.Module | Adapter],
    rows: Sequence[ManifestRow | Any],
    methods: Sequence[str] = ("encoder_spes",),
    metrics: Sequence[str] = ("pearson", "spearman"),
    targets: str = "generate",
    module: str | None = None,
    processor: Any = None,
    names: Sequence[str] | None = None,
    batch_size: int = 4,
    trainer_kwargs: dict[str, Any] | None = None,
    keep_explanations: int = 2,
    progress: bool = True,
    on_checkpoint: Callable[[CheckpointResult], None] | None = None,
    base_model: str | None = None,
    **method_options: Any,
) -> Comparison:
    """Explain the same probe ``rows`` with every checkpoint and put the results side by side.

    Args:
        checkpoints: HF directories / hub ids, Lightning ``.ckpt`` paths (with ``module``), or
            already loaded models (then pass ``processor``).
        rows: probe utterances: manifest rows (``xattn_lightning.audio.read_manifest``), or batches of one
            utterance each in any layout the monitor reads (then no processor is needed for features).
        methods: saliency methods, as in :func:`xattn_lightning.explain`.
        metrics: correlation metrics (``pearson``, ``spearman``, ``kendall``).
        targets: ``"generate"`` or ``"labels"``, as in :func:`xattn_lightning.explain`.
        module: the LightningModule class (``"pkg.mod:Class"``) that loads ``.ckpt`` files.
        processor: the processor of already loaded models (for features and text).
        names: one display name per checkpoint (default: their paths or class names).
        batch_size: probe utterances per batch.
        progress: show a progress bar.
        on_checkpoint: called with each :class:`CheckpointResult` as soon as it is done.
        **method_options: saliency options, as in :func:`xattn_lightning.explain`.
        trainer_kwargs: ``lightning.Trainer`` arguments (``devices``, ``num_nodes``, ``strategy``,
            ``accelerator``) for spreading the probes over processes.
        keep_explanations: explanations kept per checkpoint (for the side-by-side heatmaps).
        base_model: the base model of PEFT adapter directories (default: the one each names).

    Example:
        >>> compare_checkpoints([], [])
        Traceback (most recent call last):
        ...
        xattn_lightning.errors.XAttnError: Expected at least one checkpoint to compare.
    """
    if not checkpoints:
        raise XAttnError("Expected at least one checkpoint to compare.")
    if not rows:
        raise XAttnError("Expected at least one probe utterance.")
    base = ReadingConfig(
        tuple(methods), tuple(metrics), targets=targets,
        saliency=SaliencyOptions.from_flat(**{"n_masks": READING_N_MASKS, **method_options}),
    )  # fmt: skip
    if names is not None and len(names) != len(checkpoints):
        raise XAttnError(f"Got {len(names)} names for {len(checkpoints)} checkpoints.")
    if "spawn" in str((trainer_kwargs or {}).get("strategy", "")):
        raise XAttnError(
            "compare collects results in the processes that compute them; use strategy='ddp' "
            "(Lightning re-launches the command per rank), not a spawn strategy."
        )
    tkw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    tkw.update(trainer_kwargs or {})
    masks = MaskCount(base)

    def run_all(
        n_masks: int | None, report: bool, keep: bool = False, resume: Sequence[CheckpointResult] = ()
    ) -> list[CheckpointResult]:
        config = base.with_masks(n_masks) if n_masks is not None else base
        out = []
        for n, ckpt in enumerate(checkpoints):
            res = _explain_checkpoint(
                ckpt, rows, config, module, processor, base_model, batch_size, tkw, progress, keep_explanations,
                keep, resume[n].resume if resume else None,
            )  # fmt: skip
            if resume:  # the whole cost of the maps: the first rung's masks and the continuation
                res.seconds += resume[n].seconds
                resume[n].resume = {}
            if names is not None:
                res.name = names[n]
            if report and on_checkpoint is not None:
                on_checkpoint(res)
            out.append(res)
        return out

    calibration: dict[str, dict[str, float]] = {}
    n_masks: int | None
    if masks.auto_pending():  # every checkpoint at the first rung, then all at the count the least
        first = MASK_LADDER[0]  # reliable one needs: the same masks for every checkpoint, a headline for each
        results = run_all(first, report=False, keep=True)
        calibration = {r.name: masks.reliabilities(r.summary.probes) for r in results}
        n_masks = masks.choose_from(
            {f"{c}/{m}": rel for c, by_m in calibration.items() for m, rel in by_m.items()}, first
        )
        cost = ""
        if n_masks != first:  # the continuation's masks at the calibration's pace, said before they run
            mask_s = sum(
                float(e.results[m].seconds)
                for r in results
                for e in r.resume.values()
                for m in masks.perturbation
                if m in e.results
            )
            cost = (
                f" The {first} took {sum(r.seconds for r in results):.0f} s ({mask_s:.0f} s of masks); the "
                f"{n_masks - first} more will take about {mask_s * (n_masks - first) / first:.0f} s (n_masks={first} "
                "reads without them, with no corrected headline where the maps stay below the floor)."
            )
        rank_zero_info(
            f"n_masks='auto': split-half reliability at {first} masks "
            + "; ".join(
                f"{name}: " + ", ".join(f"{rel:.2f}" for rel in by_m.values()) for name, by_m in calibration.items()
            )
            + f" -> {n_masks} masks for every checkpoint (predicted to reach {AUTO_RELIABILITY_TARGET})."
            + cost
        )
        if n_masks != first:  # the first rung's masks are continued, not computed again
            results = run_all(n_masks, report=True, resume=results)
        else:
            for res in results:
                res.resume = {}
                if on_checkpoint is not None:
                    on_checkpoint(res)
    else:
        results = run_all(masks.count() if masks.perturbation else None, report=True)
        n_masks = masks.count() if masks.perturbation else None
    return Comparison(
        tuple(methods),
        tuple(metrics),
        [_probe_id(i, r) for i, r in enumerate(rows)],
        results,
        n_masks=n_masks,
        calibration=calibration,
    )


def _explain_checkpoint(
    ckpt: str | nn.Module | Adapter,
    rows: Sequence[ManifestRow | Any],
    config: ReadingConfig,
    module: str | None,
    processor: Any,
    base_model: str | None,
    batch_size: int,
    tkw: dict[str, Any],
    progress: bool,
    keep_explanations: int,
    keep_all: bool = False,
    resume: dict[str, Explanation] | None = None,
) -> CheckpointResult:
    """One checkpoint through the probes (a Lightning ``predict``, spread over ``tkw``'s devices);
    ``keep_all``: keep every probe's explanation to continue (:attr:`CheckpointResult.resume`); ``resume``:
    continue those explanations' maps to the config's mask count."""
    start = time.perf_counter()
    if isinstance(ckpt, (str, Path)):
        model, proc, name = load_checkpoint(str(ckpt), module, None, base_model)
        if processor is not None:
            proc = processor
    else:
        if processor is None and any(isinstance(r, ManifestRow) for r in rows):
            raise XAttnError("A loaded model needs processor=... to turn audio into features.")
        model, proc, name = ckpt, processor, type(ckpt).__name__
    lit = _ExplainerModule(model, proc, config, resume)
    trainer = pl.Trainer(inference_mode=False, enable_progress_bar=progress, enable_model_summary=False, **tkw)
    loader = DataLoader(_Rows(rows), batch_size=batch_size, collate_fn=_collate)
    trainer.predict(lit, loader, return_predictions=False)
    metric = lit.metric
    metric.sync(TorchDistributed().all_gather)  # one gather of every process's probes
    metric.probes = _once(metric.probes, lambda p: p.position)
    metric.failures = _once(metric.failures, lambda f: f.position)
    explained = _once(metric.explained, lambda x: x[0])  # type: ignore[attr-defined]
    if not metric.probes:
        reasons = "; ".join(f"{f.id}: {f.cause}" for f in metric.failures[:2])
        raise XAttnError(f"{name}: no probe utterance could be explained ({reasons}).")
    summary = metric.compute()
    if summary.failures:
        first = summary.failures[0]
        rank_zero_warn(
            f"{name}: {len(summary.failures)} probe(s) could not be explained, e.g. {first.id}: {first.cause}"
        )
    explanations = [e for _, _, e in explained]
    return CheckpointResult(
        name=name,
        summary=summary,
        wer=_wer(summary, explanations),
        seconds=time.perf_counter() - start,
        explanations=explanations[:keep_explanations],
        resume={pid: e for _, pid, e in explained} if keep_all else {},
    )
