"""What ``compare`` gives and writes: a :class:`CheckpointResult` per checkpoint and the :class:`Comparison` of
them side by side (its table, its paired differences), the CSV, the JSON and the figures
(:func:`write_comparison`), and one W&B run of it (:func:`log_comparison_to_wandb`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xattn_lightning.errors import XAttnError
from xattn_lightning.explain import Explanation
from xattn_lightning.functional import RELIABILITY_FLOOR
from xattn_lightning.saliency import perturbation_methods
from xattn_lightning.summary import MAX_RELIABILITY_GAP, Difference, Summary, paired_differences


@dataclass
class CheckpointResult:
    """What one checkpoint gave on the probes: its reading's :class:`~xattn_lightning.summary.Summary` (scalars,
    head ranking, grids, every probe's scores and failures), the WER of its hypotheses, and the seconds it took."""

    name: str
    summary: Summary
    wer: float
    seconds: float
    explanations: list[Explanation] = field(default_factory=list, repr=False)
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
                for d in paired_differences(ref.summary.probes, r.summary.probes, m, self.reliability_floor).values()
            }
        return out

    def _comparable(self, key: str) -> str:
        """Why the per-checkpoint numbers under ``key`` must not be read side by side ("" when they can)."""
        m, _, what = key.rpartition("/")
        if m not in perturbation_methods(self.methods) or what not in ("pearson", "pearson_ci_low", "pearson_ci_high"):
            return ""
        rels = [r.summary.scalars.get(f"{m}/reliability", math.nan) for r in self.results]
        if len(rels) > 1 and not max(rels) - min(rels) <= MAX_RELIABILITY_GAP:
            return f"maps of unequal reliability ({', '.join(f'{x:.2f}' for x in rels)}): read pearson_corrected"
        return ""

    def columns(self) -> list[str]:
        """Scalar columns present for every checkpoint, in a stable order."""
        keys = [k for k in self.results[0].summary.scalars if all(k in r.summary.scalars for r in self.results)]
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
            vals = [r.wer if k == "wer" else r.summary.scalars[k] for r in self.results]
            lines.append(f"{k:<{kw}}  " + "  ".join(f"{_fmt(v):>{w}}" for v, w in zip(vals, widths)))
        if self.n_masks is not None:
            lines.append(f"{'masks per map':<{kw}}  {self.n_masks}" + (" (n_masks='auto')" if self.calibration else ""))
        for m in perturbation_methods(self.methods):  # the headline, or why a checkpoint has none
            key = f"{m}/pearson_corrected"
            if key in keys:
                continue
            shown = [
                _fmt(r.summary.scalars[key])
                if key in r.summary.scalars
                else f"<floor ({r.summary.scalars.get(f'{m}/reliability', math.nan):.2f})"
                for r in self.results
            ]
            lines.append(f"{key:<{kw}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(shown, widths)))
        for m in self.methods:
            heads = []
            for r in self.results:
                rk = r.summary.head_ranking.get(m) or []
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
                    "scalars": r.summary.scalars,
                    "head_ranking": {m: [list(x) for x in rk] for m, rk in r.summary.head_ranking.items()},
                    "grids": r.summary.grids,
                    "seconds": r.seconds,
                    "probes": [p.row() for p in r.summary.probes],
                    "failures": [[f.id, f.cause] for f in r.summary.failures],
                }
                for r in self.results
            ],
        }


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


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
            w.writerow([r.name, r.wer, *(r.summary.scalars[c] for c in cols), r.seconds])
    files["json"] = out / "comparison.json"
    files["json"].write_text(json.dumps(comp.to_dict(), indent=1, default=float))
    for m in comp.methods:
        series = {
            r.name: [r.summary.scalars.get(f"{m}/pearson_layer{i}", math.nan) for i in range(len(r.summary.grids[m]))]
            for r in comp.results
        }
        files[f"layers_{m}"] = save_figure(layers_figure(series, f"ρ(CA, {m}) per layer"), out / f"layers_{m}.png")
    n_shared = min(len(r.explanations) for r in comp.results)
    for i in range(n_shared):
        exps = {r.name: r.explanations[i] for r in comp.results}
        scores = {r.name: r.summary.probes[i].pearson() for r in comp.results}
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
            table.add_data(r.name, r.wer, *(r.summary.scalars[c] for c in cols))
        payload: dict[str, Any] = {"compare/table": table}
        for key, path in files.items():
            if path.suffix == ".png":
                payload[f"compare/{key}"] = wandb.Image(str(path))
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()
