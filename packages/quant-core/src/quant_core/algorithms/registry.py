"""The registry of calibration algorithms: ``fn(model, forward_loop, **options) -> None`` by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ForwardLoop = Callable[[nn.Module], Any]
Algorithm = Callable[..., None]

_ALGORITHMS: dict[str, Algorithm] = {}

# Algorithms that quant-core's own folder is expected to provide, and the module providing each.
_PROVIDERS = {
    "smoothquant": "quant_core.algorithms.smoothquant",
    "awq_lite": "quant_core.algorithms.awq",
    "awq_clip": "quant_core.algorithms.awq",
    "awq_full": "quant_core.algorithms.awq",
    "gptq": "quant_core.algorithms.gptq",
    "awq_gptq": "quant_core.algorithms.awq_gptq",
    "svdquant": "quant_core.algorithms.svdquant",
    "mse": "quant_core.algorithms.mse",
}


def register_algorithm(name: str) -> Callable[[Algorithm], Algorithm]:
    """Decorator registering ``fn(model, forward_loop, **options)`` as calibration algorithm ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")

    def decorator(fn: Algorithm) -> Algorithm:
        _ALGORITHMS[name] = fn
        return fn

    return decorator


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a clear ``ValueError`` when there is none."""
    from quant_core.plugins import load_plugins

    load_plugins()
    if name in _ALGORITHMS:
        return _ALGORITHMS[name]
    known = ", ".join(sorted(_ALGORITHMS)) or "(none)"
    hint = ""
    if name in _PROVIDERS:
        hint = f"; it is provided by module {_PROVIDERS[name]}, which is not present in this installation"
    raise ValueError(
        f"unknown calibration algorithm {name!r}{hint}. Registered algorithms: {known}"
    )


def available_algorithms() -> list[str]:
    """Names of the registered algorithms."""
    return sorted(_ALGORITHMS)
