"""Errors raised by xattn_lightning, each naming what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


class XAttnError(ValueError):
    """Base class of the package's input errors (a ``ValueError``)."""


class UnknownNameError(XAttnError):
    """A method, metric, pooling or preset name that does not exist; lists the valid ones."""

    def __init__(self, kind: str, name: object, valid: Iterable[str]) -> None:
        valid = sorted(valid)
        super().__init__(f"Unknown {kind} {name!r}. Valid {kind}s are: {', '.join(valid)}.")
        self.valid = valid


class UnsupportedModelError(XAttnError, TypeError):
    """The model is not one the package knows how to read cross-attention from."""


def check_choice(kind: str, name: str, valid: Iterable[str]) -> str:
    """Return ``name`` if it is one of ``valid``, else raise :class:`UnknownNameError`.

    >>> check_choice("metric", "pearson", ["pearson", "spearman"])
    'pearson'
    """
    valid = list(valid)
    if name not in valid:
        raise UnknownNameError(kind, name, valid)
    return name


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    >>> first_line(OSError("no such file\\nTraceback ..."))
    'no such file'
    """
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
