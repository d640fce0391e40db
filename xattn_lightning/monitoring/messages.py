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

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn

from xattn_lightning.errors import XAttnError

Say = Callable[[str], None]


class Messages:
    """The warning policy of a monitor.

    Args:
        on_error: ``"warn"`` (warn once per cause and carry on) or ``"raise"``.
        warn / info: print a message on the main process (default: Lightning's rank-zero utilities,
            which read the process rank from the environment, so they also work under torchrun).
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
        self.warn: Say = warn or rank_zero_warn
        self.say: Say = info or rank_zero_info
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
