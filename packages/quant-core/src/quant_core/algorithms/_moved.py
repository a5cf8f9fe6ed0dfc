"""Names that moved to the shared helper modules stay importable from their old algorithm module."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def moved_names(module: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``homes`` (``{old name: "new.module:name"}``) lazily,
    so code written against the old import path keeps working without an import cycle."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, _, new_name = homes[name].partition(":")
        return getattr(importlib.import_module(home), new_name or name)

    return __getattr__
