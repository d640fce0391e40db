"""Doctests of the package: those that need an optional extra skip, with the reason, where it is missing."""

from __future__ import annotations

import importlib.util

import pytest

#: package modules whose doctests use an optional extra: module path fragment -> (import name, extra)
OPTIONAL = {"xattn_lightning/adapters/openai_whisper.py": ("whisper", "openai-whisper")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the doctests of :data:`OPTIONAL` modules skipped where their extra is not installed."""
    for fragment, (module, extra) in OPTIONAL.items():
        if importlib.util.find_spec(module) is not None:
            continue
        skip = pytest.mark.skip(reason=f"{module} is not installed: pip install -e '.[{extra}]' (or '.[dev]')")
        for item in items:
            if type(item).__name__ == "DoctestItem" and fragment in item.nodeid:
                item.add_marker(skip)
