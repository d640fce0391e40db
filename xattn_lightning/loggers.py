"""A W&B logger that works without an account: offline unless an API key is configured."""

from __future__ import annotations

import netrc
import os
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
