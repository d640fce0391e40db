"""Comparing checkpoints: the same probe utterances through several models, side by side.

``compare_checkpoints`` runs each checkpoint through a Lightning ``Trainer.predict`` over the probe
set (so ``devices``/``num_nodes``/``strategy`` spread the work with Lightning's own DDP), computes
agreement per method, layer and head, the WER of each checkpoint on the probes, and returns a
:class:`Comparison`; ``write_comparison`` saves the CSV, JSON and figures.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from xattn_lightning.checkpoints import consolidate_sharded_checkpoint
from xattn_lightning.errors import XAttnError, first_line
from xattn_lightning.explain import Explanation
from xattn_lightning.functional import AUTO_RELIABILITY_TARGET, MASK_LADDER, RELIABILITY_FLOOR, choose_n_masks
from xattn_lightning.loading import features_batch, load_hf_model
from xattn_lightning.monitoring.probes import split_batch
from xattn_lightning.reading import Probe, ReadingConfig, read
from xattn_lightning.saliency import perturbation_methods, validate_methods
from xattn_lightning.saliency.options import READING_DEFAULTS
from xattn_lightning.summary import (
    MAX_RELIABILITY_GAP,
    Difference,
    paired_differences,
    pearson_scores,
    summarize,
)
from xattn_lightning.text import wer


@dataclass
class CheckpointResult:
    """What one checkpoint gave on the probes."""

    name: str
    scalars: dict[str, float]
    wer: float
    rows: list[dict[str, Any]]
    head_ranking: dict[str, list[tuple[int, int, float]]]
    grids: dict[str, list[list[float]]]
    seconds: float
    explanations: list[Explanation] = field(default_factory=list, repr=False)
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: probe id -> explanation, of every probe, where a reading at more masks will continue these maps
    resume: dict[str, Explanation] = field(default_factory=dict, repr=False)


@dataclass
class Comparison:
    """Side-by-side results, one :class:`CheckpointResult` per checkpoint (input order)."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    probe_ids: list[str]
    results: list[CheckpointResult]
    #: the masks per map every checkpoint was read with (``None`` without perturbation methods)
    n_masks: int | None = None
    #: with ``n_masks="auto"``: checkpoint -> method -> split-half reliability at the first rung
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    reliability_floor: float = RELIABILITY_FLOOR

    def differences(self, base: int = 0) -> dict[str, dict[str, Difference]]:
        """Each other checkpoint against ``results[base]``: ``"<method>/pearson_corrected"`` and
        ``"<method>/pearson"`` as :class:`~xattn_lightning.summary.Difference` (paired over the probes and
        masks both explained, with a 95 % interval, or not comparable with the reason)."""
        ref = self.results[base]
        out: dict[str, dict[str, Difference]] = {}
        for r in self.results:
            if r is ref:
                continue
            out[r.name] = {
                d.key: d
                for m in perturbation_methods(self.methods)
                for d in paired_differences(ref.rows, r.rows, m, self.reliability_floor).values()
            }
        return out

    def _comparable(self, key: str) -> str:
        """Why the per-checkpoint numbers under ``key`` must not be read side by side ("" when they can)."""
        m, _, what = key.rpartition("/")
        if m not in perturbation_methods(self.methods) or what not in ("pearson", "pearson_ci_low", "pearson_ci_high"):
            return ""
        rels = [r.scalars.get(f"{m}/reliability", math.nan) for r in self.results]
        if len(rels) > 1 and not max(rels) - min(rels) <= MAX_RELIABILITY_GAP:
            return f"maps of unequal reliability ({', '.join(f'{x:.2f}' for x in rels)}): read pearson_corrected"
        return ""

    def columns(self) -> list[str]:
        """Scalar columns present for every checkpoint, in a stable order."""
        keys = [k for k in self.results[0].scalars if all(k in r.scalars for r in self.results)]
        return keys

    def table(self) -> str:
        """A text table, one column per checkpoint and one row per number (WER first)."""
        keys = ["wer"] + [c for c in self.columns() if not c.endswith(("best_head_layer", "best_head_index"))]
        names = [r.name for r in self.results]
        kw = max(len(k) for k in keys)
        widths = [max(8, len(n)) for n in names]
        lines = [f"{'':<{kw}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        lines.append("-" * len(lines[0]))
        for k in keys:
            why = self._comparable(k)
            if why:  # not printed beside each other: the numbers would mislead
                lines.append(f"{k:<{kw}}  not comparable: {why}")
                continue
            vals = [r.wer if k == "wer" else r.scalars[k] for r in self.results]
            lines.append(f"{k:<{kw}}  " + "  ".join(f"{_fmt(v):>{w}}" for v, w in zip(vals, widths)))
        if self.n_masks is not None:
            lines.append(f"{'masks per map':<{kw}}  {self.n_masks}" + (" (n_masks='auto')" if self.calibration else ""))
        for m in perturbation_methods(self.methods):  # the headline, or why a checkpoint has none
            key = f"{m}/pearson_corrected"
            if key in keys:
                continue
            shown = [
                _fmt(r.scalars[key])
                if key in r.scalars
                else f"<floor ({r.scalars.get(f'{m}/reliability', math.nan):.2f})"
                for r in self.results
            ]
            lines.append(f"{key:<{kw}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(shown, widths)))
        for m in self.methods:
            heads = []
            for r in self.results:
                rk = r.head_ranking.get(m) or []
                heads.append(f"L{rk[0][0]}H{rk[0][1]}" if rk else "-")
            lines.append(f"{m + '/best_head':<{kw}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
        diffs = self.differences() if len(self.results) > 1 else {}
        if diffs:
            lines.append("")
            lines.append(f"change from {self.results[0].name} (paired over the probes, 95 % interval):")
            for name, by_key in diffs.items():
                for key in sorted(by_key, key=lambda k: (k.rpartition("/")[0], not k.endswith("corrected"))):
                    lines.append(f"  {name}: {key}  {by_key[key]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The comparison as plain JSON-ready data (what ``comparison.json`` holds)."""
        return {
            "methods": list(self.methods),
            "metrics": list(self.metrics),
            "probe_ids": self.probe_ids,
            "n_masks": self.n_masks,
            "calibration": self.calibration,
            "differences": {
                name: {k: dataclasses.asdict(d) for k, d in by_key.items()}
                for name, by_key in (self.differences() if len(self.results) > 1 else {}).items()
            },
            "checkpoints": [
                {
                    "name": r.name,
                    "wer": r.wer,
                    "scalars": r.scalars,
                    "head_ranking": {m: [list(x) for x in rk] for m, rk in r.head_ranking.items()},
                    "grids": r.grids,
                    "seconds": r.seconds,
                    "probes": r.rows,
                    "failures": [list(f) for f in r.failures],
                }
                for r in self.results
            ],
        }


def _wer(outputs: list[tuple[int, dict, Explanation]]) -> float:
    """WER of the hypotheses on the probes (``nan`` without a tokenizer to turn ids into text)."""
    if any(e.text is None for _, _, e in outputs):
        return math.nan
    return wer([s["text"] for _, s, _ in outputs], [e.text or "" for _, _, e in outputs])


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


# ---------------------------------------------------------------------------- loading
def load_checkpoint(
    spec: str, module: str | None = None, processor: str | None = None, base_model: str | None = None
) -> tuple[Any, Any, str]:
    """Load ``spec`` (HF directory / hub id, a PEFT adapter directory onto ``base_model`` or the base
    its config names, or a Lightning ``.ckpt`` with ``module="pkg.mod:Class"``: a file, or a directory of
    shards as FSDP, ModelParallel and DeepSpeed save it, consolidated by
    :func:`~xattn_lightning.checkpoints.consolidate_sharded_checkpoint`).

    Returns ``(model, processor, name)``; the model is whatever :func:`xattn_lightning.adapter_for`
    accepts (for a LightningModule: its ``xattn_adapter`` or the HF model it wraps).
    """
    path = Path(spec.rstrip("/"))
    if path.suffix == ".ckpt":
        if not path.exists():
            raise XAttnError(f"Checkpoint {spec!r} does not exist.")
        if module is None:
            raise XAttnError(f"{spec!r} is a Lightning checkpoint; pass --module package.module:Class to load it.")
        cls: Any = _import_class(module)
        try:
            if path.is_dir():  # shards (FSDP, ModelParallel, DeepSpeed): consolidated into one file first
                with tempfile.TemporaryDirectory() as tmp:
                    whole = consolidate_sharded_checkpoint(path, Path(tmp) / path.name)
                    lit = cls.load_from_checkpoint(str(whole), map_location="cpu")
            else:
                lit = cls.load_from_checkpoint(str(path), map_location="cpu")
        except XAttnError:
            raise
        except Exception as err:
            raise XAttnError(f"Cannot load {spec!r} with {module}: {type(err).__name__}: {first_line(err)}") from err
        lit.eval()
        model = getattr(lit, "xattn_adapter", None) or lit
        proc = getattr(lit, "processor", None)
        if processor is not None:
            proc = load_hf_model_processor(processor)
        if proc is None:
            raise XAttnError(f"{module} has no .processor to turn audio into features; pass --processor HF_DIR_OR_ID.")
        _check_s2t(model, spec)
        return model, proc, path.stem
    model, proc = load_hf_model(spec, base_model=base_model)
    if processor is not None:
        proc = load_hf_model_processor(processor)
    return model, proc, path.name if path.exists() else spec


def load_hf_model_processor(name_or_path: str) -> Any:
    """Only the processor of a Hugging Face checkpoint."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(name_or_path)
    except Exception as err:
        raise XAttnError(f"Cannot load a processor from {name_or_path!r}: {first_line(err)}") from err


def _check_s2t(model: Any, spec: str) -> None:
    try:
        adapter_for(model)
    except XAttnError as err:
        raise XAttnError(f"{spec!r} is not a speech-to-text encoder-decoder this tool can read: {err}") from err


def _import_class(spec: str) -> type:
    mod_name, sep, cls_name = spec.partition(":")
    if not sep or not mod_name or not cls_name:
        raise XAttnError(f"Expected --module as package.module:Class but got {spec!r}.")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # modules of the current directory, as `python -m` would find them
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:
        raise XAttnError(f"Cannot import {mod_name!r}: {type(err).__name__}: {first_line(err)}") from err
    cls = getattr(mod, cls_name, None)
    if cls is None or not hasattr(cls, "load_from_checkpoint"):
        raise XAttnError(f"{spec!r} is not a LightningModule class.")
    return cls


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
        self.outputs: list[tuple[int, dict, Explanation]] = []
        self.failures: list[tuple[int, str, str]] = []

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
        position = {p.id: p.position for p in probes}
        self.outputs += [(res.probe.position, res.scores, res.explanation) for res in reading.results]
        self.failures += [(position[pid], pid, cause.removeprefix("XAttnError: ")) for pid, cause in reading.failures]


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


def _gather(outputs: list) -> list:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, outputs)
        outputs = [x for p in parts for x in p]
    seen: dict[int, Any] = {}
    for item in outputs:  # the distributed sampler repeats items to even out the ranks
        seen.setdefault(item[0], item)
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
    validate_methods(methods, method_options)
    if not methods:
        raise XAttnError("Expected at least one saliency method; see xl.list_methods().")
    if names is not None and len(names) != len(checkpoints):
        raise XAttnError(f"Got {len(names)} names for {len(checkpoints)} checkpoints.")
    if "spawn" in str((trainer_kwargs or {}).get("strategy", "")):
        raise XAttnError(
            "compare collects results in the processes that compute them; use strategy='ddp' "
            "(Lightning re-launches the command per rank), not a spawn strategy."
        )
    tkw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    tkw.update(trainer_kwargs or {})
    options = {"n_masks": READING_DEFAULTS["n_masks"], **method_options}
    perturbation = perturbation_methods(methods)
    if not perturbation:
        options.pop("n_masks")

    def run_all(
        n_masks: int | None, report: bool, keep: bool = False, resume: Sequence[CheckpointResult] = ()
    ) -> list[CheckpointResult]:
        config = ReadingConfig(tuple(methods), tuple(metrics), targets=targets, options=dict(options))
        if n_masks is not None:
            config = config.with_options(n_masks=n_masks)
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
    if options.get("n_masks") == "auto":  # every checkpoint at the first rung, then all at the count the least
        first = MASK_LADDER[0]  # reliable one needs: the same masks for every checkpoint, a headline for each
        results = run_all(first, report=False, keep=True)
        n_masks, calibration = comparison_masks(results, methods, first)
        rank_zero_info(
            f"n_masks='auto': split-half reliability at {first} masks "
            + "; ".join(
                f"{name}: " + ", ".join(f"{rel:.2f}" for rel in by_m.values()) for name, by_m in calibration.items()
            )
            + f" -> {n_masks} masks for every checkpoint (predicted to reach {AUTO_RELIABILITY_TARGET})."
        )
        if n_masks != first:  # the first rung's masks are continued, not computed again
            results = run_all(n_masks, report=True, resume=results)
        else:
            for res in results:
                res.resume = {}
                if on_checkpoint is not None:
                    on_checkpoint(res)
    else:
        results = run_all(None, report=True)
        n_masks = options.get("n_masks")
    return Comparison(
        tuple(methods), tuple(metrics), [_probe_id(i, r) for i, r in enumerate(rows)], results, n_masks=n_masks, calibration=calibration
    )


def comparison_masks(
    results: Sequence[CheckpointResult], methods: Sequence[str], measured_at: int = MASK_LADDER[0]
) -> tuple[int, dict[str, dict[str, float]]]:
    """``n_masks="auto"`` for a comparison: from every checkpoint's reading at ``measured_at`` masks, the
    smallest rung that brings each checkpoint's and method's maps to the target reliability
    (:func:`~xattn_lightning.functional.choose_n_masks`, the largest over checkpoints), and the measured
    reliabilities (checkpoint -> method -> reliability).

    >>> r = CheckpointResult("a", {"encoder_spes/reliability": 0.24}, 0.0, [], {}, {}, 0.0)
    >>> comparison_masks([r], ["encoder_spes"])
    (1024, {'a': {'encoder_spes': 0.24}})
    """
    measured = {
        r.name: {m: r.scalars.get(f"{m}/reliability", math.nan) for m in perturbation_methods(methods)} for r in results
    }
    n = max(choose_n_masks(measured_at, rel) for by_method in measured.values() for rel in by_method.values())
    return n, measured


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
    outputs = _gather(lit.outputs)
    failures = _gather(lit.failures)
    if not outputs:
        reasons = "; ".join(f"{pid}: {msg}" for _, pid, msg in failures[:2])
        raise XAttnError(f"{name}: no probe utterance could be explained ({reasons}).")
    scores = [s for _, s, _ in outputs]
    summary = summarize(scores, config.methods, config.metrics)
    if failures:
        rank_zero_warn(
            f"{name}: {len(failures)} probe(s) could not be explained, e.g. {failures[0][1]}: {failures[0][2]}"
        )
    return CheckpointResult(
        name=name,
        scalars=summary.scalars,
        wer=_wer(outputs),
        rows=scores,
        head_ranking=summary.head_ranking,
        grids=summary.grids,
        seconds=time.perf_counter() - start,
        explanations=[e for _, _, e in outputs[:keep_explanations]],
        failures=[(pid, msg) for _, pid, msg in failures],
        resume={rows[i].id: e for i, _, e in outputs} if keep_all else {},
    )


# ---------------------------------------------------------------------------- writing
def write_comparison(comp: Comparison, out: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.json``, ``layers_<method>.png`` (per-layer ρ of each checkpoint)
    and ``heatmaps_<probe>.png`` (the same utterance through every checkpoint, side by side)."""
    from xattn_lightning.viz.heatmap import comparison_heatmaps, layers_figure, save_figure

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise XAttnError(f"Cannot create the output folder {str(out)!r}: {err.strerror}.") from err
    files: dict[str, Path] = {}
    cols = comp.columns()
    files["csv"] = out / "comparison.csv"
    with files["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "wer", *cols, "seconds"])
        for r in comp.results:
            w.writerow([r.name, r.wer, *(r.scalars[c] for c in cols), r.seconds])
    files["json"] = out / "comparison.json"
    files["json"].write_text(json.dumps(comp.to_dict(), indent=1, default=float))
    for m in comp.methods:
        series = {
            r.name: [r.scalars.get(f"{m}/pearson_layer{i}", math.nan) for i in range(len(r.grids[m]))]
            for r in comp.results
        }
        files[f"layers_{m}"] = save_figure(layers_figure(series, f"ρ(CA, {m}) per layer"), out / f"layers_{m}.png")
    n_shared = min(len(r.explanations) for r in comp.results)
    for i in range(n_shared):
        exps = {r.name: r.explanations[i] for r in comp.results}
        scores = {r.name: pearson_scores(r.rows[i], comp.methods) for r in comp.results}
        pid = comp.probe_ids[i]
        files[f"heatmaps_{pid}"] = save_figure(
            comparison_heatmaps(exps, comp.methods, title=pid, scores=scores), out / f"heatmaps_{pid}.png"
        )
    return files


def log_comparison_to_wandb(
    comp: Comparison, files: dict[str, Path], out: str | Path, project: str = "xattn-lightning"
) -> str:
    """Log the comparison as one W&B run (offline without an API key); returns the run directory."""

    import wandb

    os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, job_type="compare", dir=str(out), config={"methods": list(comp.methods)})
    try:
        cols = comp.columns()
        table = wandb.Table(columns=["checkpoint", "wer", *cols])
        for r in comp.results:
            table.add_data(r.name, r.wer, *(r.scalars[c] for c in cols))
        payload: dict[str, Any] = {"compare/table": table}
        for key, path in files.items():
            if path.suffix == ".png":
                payload[f"compare/{key}"] = wandb.Image(str(path))
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()
