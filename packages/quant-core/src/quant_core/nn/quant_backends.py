"""Custom quantization backends (ModelOpt's ``register_quant_backend``): functions a quantizer calls
instead of its built-in fake quantization when its ``backend`` attribute names them.

An entrypoint is ``fn(x, quantizer) -> Tensor``; it can read the quantizer's attributes, its
``amax`` (calibrated as usual) and ``backend_extra_args``. Quantizers with a custom backend run
in PyTorch only: export and ``compress`` refuse them, since their numerics are the user's code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch


class TensorQuantizerCache(Protocol):
    """What a custom backend keeps in ``quantizer._quantizer_cache`` (ModelOpt's protocol).

    The slot starts as None; a backend may store any object there on its first call (precomputed
    tables, packed weights) and read it back on later calls. It is never saved or restored: a
    restored quantizer starts with None and its backend fills it again.
    """


QuantBackendEntrypoint = Callable[[torch.Tensor, "object"], torch.Tensor]

_BACKENDS: dict[str, QuantBackendEntrypoint] = {}


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")


def register_quant_backend(name: str, entrypoint: QuantBackendEntrypoint) -> None:
    """Register ``entrypoint(x, quantizer)`` under ``name`` (a warning when it replaces one)."""
    _check_name(name)
    if not callable(entrypoint):
        raise TypeError(f"backend entrypoint must be callable, got {entrypoint!r}")
    if name in _BACKENDS:
        warnings.warn(f"overwriting quantization backend {name!r}", stacklevel=2)
    _BACKENDS[name] = entrypoint


def unregister_quant_backend(name: str) -> None:
    """Remove the backend ``name`` (nothing happens when it is not registered)."""
    _check_name(name)
    _BACKENDS.pop(name, None)


def is_registered_quant_backend(name: str) -> bool:
    """Whether a backend named ``name`` is registered."""
    return name in _BACKENDS


def get_quant_backend(name: str) -> QuantBackendEntrypoint:
    """The entrypoint registered as ``name``; KeyError naming the registered ones otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise KeyError(
            f"quantization backend {name!r} is not registered (registered: {sorted(_BACKENDS)}); "
            "register it with quant_core.nn.register_quant_backend(name, fn)"
        ) from None


__all__ = [
    "is_registered_quant_backend",
    "register_quant_backend",
    "unregister_quant_backend",
]
