"""ModelOpt's ``quantization.plugins.huggingface`` names, provided by quant-llm and loaded on first use.

quant-llm publishes them through the ``quant_core.plugins`` entry point (feature
``plugins.huggingface``); without quant-llm, using a name raises an ImportError saying what to install.
"""

from __future__ import annotations

from typing import Any

from quant_core.plugins import get_feature


def _names() -> dict[str, Any]:
    return get_feature("plugins.huggingface")()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    names = _names()
    if name not in names:
        raise AttributeError(
            f"quant_core.plugins.huggingface has no {name!r}; available: {', '.join(sorted(names))}"
        )
    return names[name]


def __dir__() -> list[str]:
    return sorted(_names())
