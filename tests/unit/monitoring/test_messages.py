"""``xattn_lightning.monitoring.messages``: each thing said once, raised when asked."""

from __future__ import annotations

import pytest

from xattn_lightning.errors import XAttnError
from xattn_lightning.monitoring import (
    Messages,
)


def test_messages_say_each_thing_once_and_raise_when_asked():
    said: list[str] = []
    m = Messages("warn", warn=said.append, info=said.append)
    m.warn_once("k", "first")
    m.warn_once("k", "again")
    m.report(ValueError("x"), "reading")
    m.report(ValueError("x"), "reading")
    assert said == ["XAttnSaliencyMonitor: first", said[1]] and "reading failed and was skipped" in said[1]
    strict = Messages("raise", warn=said.append, info=said.append)
    with pytest.raises(ValueError, match="boom"), strict.guard("on_fit_start"):
        raise ValueError("boom")
    with pytest.raises(XAttnError, match="told"):
        strict.warn_once("k", "told")
