"""What a monitor tells its user: each warning once per cause, never silently, never a crash of training.

A host (the Lightning callback, the Hugging Face Trainer callback) names the functions that print on
the main process only; the policy (once per key, ``on_error="raise"`` lets faults through, a hook's
body runs under :meth:`Messages.guard`) lives here, once.

Example:
    >>> said = []
    >>> messages = Messages(on_error="warn", warn=said.append, info=said.append)
    >>> with messages.guard("on_fit_start"):
    ...     raise ValueError("boom")
    >>> with messages.guard("on_fit_start"):
    ...     raise ValueError("boom again")
    >>> len(said), said[0].split(" (")[0]
    (1, 'XAttnSaliencyMonitor: its on_fit_start hook failed and was skipped')
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from xattn_lightning.errors import XAttnError

Say = Callable[[str], None]
#: packages whose frames are never the user's: a warning points at the first frame outside them (the line of
#: the user's script that called ``trainer.fit``/``train``, or the test)
FRAMEWORKS: tuple[str, ...] = (
    "xattn_lightning", "lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning", "transformers",
    "accelerate", "torch", "nemo", "jsonargparse", "contextlib", "functools", "importlib",
)  # fmt: skip
_log = logging.getLogger("xattn_lightning")
if _log.level == logging.NOTSET:  # information is shown unless the application says otherwise
    _log.setLevel(logging.INFO)


def _framework_dirs() -> list[str]:
    dirs = []
    for name in FRAMEWORKS:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            path = Path(file)
            dirs.append(str(path.parent if path.name == "__init__.py" else path))
    return dirs


def user_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn``, called by this function's caller, that names the first frame
    outside the frameworks (:data:`FRAMEWORKS`): the user's own line."""
    dirs = _framework_dirs()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and any(frame.f_code.co_filename.startswith(d) for d in dirs):
        frame, level = frame.f_back, level + 1
    return level


def main_process() -> bool:
    """Whether this is the process that prints: rank 0 of ``torch.distributed`` once it runs, else of the
    launcher's environment (torchrun, SLURM, Lightning's ``ddp``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return os.environ[key] == "0"
    return True


def warn_at_user(message: str) -> None:
    """Warn ``message`` on the main process only, attributed to the user's code (:func:`user_stacklevel`)."""
    if main_process():
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())


def info(message: str) -> None:
    """Say ``message`` on the main process only (the ``xattn_lightning`` logger, else standard error)."""
    if main_process():
        if _log.hasHandlers():
            _log.info(message)
        else:
            print(message, file=sys.stderr)


class Messages:
    """The warning policy of a monitor.

    Args:
        on_error: ``"warn"`` (warn once per cause and carry on) or ``"raise"``.
        warn / info: print a message on the main process (default: :func:`warn_at_user`, a warning that
            names the user's line rather than the package's, and :func:`info`).
        name: the prefix of every message.
    """

    def __init__(
        self,
        on_error: str = "warn",
        warn: Say | None = None,
        info: Say | None = None,
        name: str = "XAttnSaliencyMonitor",
    ) -> None:
        self.on_error = on_error
        self.warn: Say = warn or warn_at_user
        self.say: Say = info or globals()["info"]
        self.name = name
        #: the keys already warned about (a key is said once per monitor)
        self.warned: set[str] = set()

    def warn_once(self, key: str, message: str, err: BaseException | None = None) -> None:
        """Warn ``message`` unless ``key`` was warned before; with ``on_error="raise"`` raise ``err``
        (or the message as an :class:`~xattn_lightning.errors.XAttnError`)."""
        if self.on_error == "raise":
            if err is not None:
                raise err
            raise XAttnError(message)
        if key not in self.warned:
            self.warned.add(key)
            self.warn(f"{self.name}: {message}")

    def info(self, message: str) -> None:
        """Say ``message`` (information, not a warning)."""
        self.say(f"{self.name}: {message}")

    def info_once(self, key: str, message: str) -> None:
        """Say ``message`` unless ``key`` was said before."""
        if key not in self.warned:
            self.warned.add(key)
            self.info(message)

    def report(self, err: BaseException, where: str, key: str | None = None) -> None:
        """``where`` failed with ``err``: warn once per ``key`` (default: the place and the error) that it
        was skipped and training continues; with ``on_error="raise"`` raise it."""
        if self.on_error == "raise":
            raise err
        key = key or f"{where}:{type(err).__name__}:{err}"
        if key not in self.warned:
            self.warned.add(key)
            self.warn(
                f"{self.name}: {where} failed and was skipped ({type(err).__name__}: {err}). "
                "Training continues; pass on_error='raise' to debug."
            )

    @contextmanager
    def guard(self, hook: str) -> Iterator[None]:
        """The body of the host's hook ``hook``: whatever goes wrong inside is warned once per hook and
        cause, and training goes on (``on_error="raise"``: it is raised)."""
        try:
            yield
        except Exception as err:
            self.report(err, f"its {hook} hook", key=f"hook:{hook}:{type(err).__name__}")
