"""What a reading draws: heatmaps, the layer × head grid and the tables, to any logger with Lightning's
``WandbLogger`` calls (``log_image``, ``log_table``), whichever host made it. No Lightning here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def log_reading_media(
    loggers: Sequence[Any],
    summary: Any,
    explanations: Sequence[tuple[str, Any]],
    step: int,
    methods: Sequence[str],
    metrics: Sequence[str],
    layers: Any = None,
    heads: Any = None,
    prefix: str = "xattn/",
) -> None:
    """Log one reading's media to W&B ``loggers`` (``WandbLogger``s of either Lightning package):
    ``heatmaps`` of the ``(probe id, explanation)`` pairs given (titled with the logged ``step`` and
    their ρ), the layer × head ``head_grid`` of each method, the ``probes`` table (a row per probe of the
    :class:`~xattn_lightning.summary.Summary`, with its heatmap) and the ``head_ranking`` table, each under
    ``prefix``."""
    import wandb

    from xattn_lightning.viz import figure_to_array, grid_figure, heatmap_figure

    scores_of = {p.id: p for p in summary.probes}
    images = {
        pid: figure_to_array(
            heatmap_figure(
                e, methods, title=f"{pid} @ step {step}", scores=scores_of[pid].pearson() if pid in scores_of else {},
                layers=layers, heads=heads,
            )  # fmt: skip
        )
        for pid, e in explanations
    }
    grids = {m: figure_to_array(grid_figure(g, f"ρ(CA, {m}) per layer × head")) for m, g in summary.grids.items()}
    columns = ["id", "text", "hypothesis", *(f"{m}/{k}" for m in methods for k in metrics), "image"]
    data = [
        [
            p.id, p.text, p.hypothesis, *(p.methods[m].agreement[k] for m in methods for k in metrics),
            wandb.Image(images[p.id]) if p.id in images else None,
        ]  # fmt: skip
        for p in summary.probes
    ]
    ranking_cols = ["method", "rank", "layer", "head", "rho"]
    ranking = [[m, i + 1, li, hi, rho] for m, rk in summary.head_ranking.items() for i, (li, hi, rho) in enumerate(rk)]
    for lg in loggers:
        if images:
            lg.log_image(prefix + "heatmaps", list(images.values()), step=step, caption=list(images))
        lg.log_image(prefix + "head_grid", list(grids.values()), step=step, caption=list(grids))
        lg.log_table(prefix + "probes", columns=columns, data=data, step=step)
        lg.log_table(prefix + "head_ranking", columns=ranking_cols, data=ranking, step=step)
