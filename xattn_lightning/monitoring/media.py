"""What a reading draws: heatmaps, the layer × head grid and the tables, to any logger with Lightning's
``WandbLogger`` calls (``log_image``, ``log_table``), whichever host made it. No Lightning here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def log_reading_media(
    loggers: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    explanations: Sequence[tuple[str, Any]],
    summary: Any,
    step: int,
    methods: Sequence[str],
    metrics: Sequence[str],
    frame_rate: float | None = None,
    layers: Any = None,
    heads: Any = None,
    prefix: str = "xattn/",
) -> None:
    """Log one reading's media to W&B ``loggers`` (``WandbLogger``s of either Lightning package):
    ``heatmaps`` of the ``(probe id, explanation)`` pairs given (titled with the logged ``step`` and
    their ρ), the layer × head ``head_grid`` of each method, the ``probes`` table (a row per probe,
    with its heatmap) and the ``head_ranking`` table, each under ``prefix``."""
    import wandb

    from xattn_lightning.summary import pearson_scores
    from xattn_lightning.viz import figure_to_array, grid_figure, heatmap_figure

    row_of = {r["id"]: r for r in rows}
    images = {
        pid: figure_to_array(
            heatmap_figure(
                e,
                methods,
                title=f"{pid} @ step {step}",
                frame_rate=frame_rate,
                scores=pearson_scores(row_of.get(pid, {}), methods),
                layers=layers,
                heads=heads,
            )  # fmt: skip
        )
        for pid, e in explanations
    }
    grids = {m: figure_to_array(grid_figure(g, f"ρ(CA, {m}) per layer × head")) for m, g in summary.grids.items()}
    scores = [f"{m}/{k}" for m in methods for k in metrics]
    columns = ["id", "text", "hypothesis", *scores, "image"]
    data = [
        [
            r["id"],
            r["text"],
            r["hypothesis"],
            *(r[c] for c in scores),
            wandb.Image(images[r["id"]]) if r["id"] in images else None,
        ]
        for r in rows
    ]
    ranking_cols = ["method", "rank", "layer", "head", "rho"]
    ranking = [[m, i + 1, li, hi, rho] for m, rk in summary.head_ranking.items() for i, (li, hi, rho) in enumerate(rk)]
    for lg in loggers:
        if images:
            lg.log_image(prefix + "heatmaps", list(images.values()), step=step, caption=list(images))
        lg.log_image(prefix + "head_grid", list(grids.values()), step=step, caption=list(grids))
        lg.log_table(prefix + "probes", columns=columns, data=data, step=step)
        lg.log_table(prefix + "head_ranking", columns=ranking_cols, data=ranking, step=step)
