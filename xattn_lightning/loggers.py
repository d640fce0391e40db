"""A W&B logger that works without an account: offline unless an API key is configured."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def wandb_api_key_configured() -> bool:
    """Whether W&B can log online: ``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
        auth = netrc.netrc(path).authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
        return auth is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(project: str = "xattn-lightning", save_dir: str | os.PathLike = ".", **kwargs: Any):
    """``lightning.pytorch.loggers.WandbLogger``, offline when no API key is configured (or
    ``WANDB_MODE=offline``); :class:`~xattn_lightning.XAttnSaliencyMonitor` prints how to sync
    an offline run when training ends.

    >>> import os; os.environ["WANDB_MODE"] = "offline"
    >>> type(wandb_logger(save_dir="/tmp")).__name__
    'WandbLogger'
    """
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_api_key_configured()
    kwargs.setdefault("offline", offline)
    return WandbLogger(project=project, save_dir=str(save_dir), **kwargs)


def offline_sync_hint(logger: Any) -> str | None:
    """``"wandb sync <run dir>"`` for a ``WandbLogger`` whose run has started offline, else ``None``
    (the run is W&B's current one: asking the logger would start a run that never logged). Either
    Lightning package's ``WandbLogger`` counts."""
    from xattn_lightning._lightning import is_logger_class

    if not is_logger_class(logger, "WandbLogger"):
        return None
    import wandb

    run = wandb.run
    if run is None or not run.offline:
        return None
    return f"wandb sync {Path(run.dir).parent}"  # .../offline-run-*/files -> the run folder


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
