"""Real-quant GEMMs: user kernels a quantized linear layer runs instead of its fake quantization.

A GEMM is ``gemm(module, input, weight, bias, *args, **kwargs) -> output`` (the output quantizer
is applied after it); it is registered with an availability check
``check(module, input, args, kwargs) -> bool`` that decides, from the module's quantizers and the
input, whether the kernel applies. :func:`enable_real_quant_gemm` marks the layers whose input and
weight quantizers are both enabled; a marked ``QuantLinear`` asks the registry for the first GEMM
whose check passes (once, then cached) and falls back to fake quantization, with one warning, when
none does. While its input quantizer calibrates a layer always runs fake quantization.

quant-core registers no GEMM of its own: its real low-precision path is ``compress`` (packed
weights run by the ``compress`` backends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "GEMMRegistry",
    "disable_real_quant_gemm",
    "enable_real_quant_gemm",
    "gemm_registry",
    "is_real_quant_gemm_enabled",
]

AvailabilityCheck = Callable[[nn.Module, torch.Tensor, tuple, dict[str, Any]], bool]


def _always(module: nn.Module, input: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    return True


class GEMMRegistry:
    """An ordered list of ``(gemm, availability check)`` pairs; the first match wins."""

    def __init__(self) -> None:
        self._entries: list[tuple[Callable[..., torch.Tensor], AvailabilityCheck]] = []

    def register(
        self, gemm_func: Callable[..., torch.Tensor], availability_check: AvailabilityCheck | None
    ) -> None:
        """Add ``gemm_func``, used where ``availability_check`` passes (always, when None)."""
        if not callable(gemm_func):
            raise TypeError(f"gemm_func must be callable, got {gemm_func!r}")
        if availability_check is not None and not callable(availability_check):
            raise TypeError(
                f"availability_check must be callable or None, got {availability_check!r}"
            )
        self._entries.append((gemm_func, availability_check or _always))

    def unregister(self, gemm_func: Callable[..., torch.Tensor]) -> None:
        """Remove every registration of ``gemm_func`` (nothing when it is not registered)."""
        self._entries = [e for e in self._entries if e[0] is not gemm_func]

    def find_match(
        self, module: nn.Module, input: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Callable[..., torch.Tensor] | None:
        """The first registered GEMM whose check passes for this module and input, else None."""
        for gemm_func, check in self._entries:
            if check(module, input, args, kwargs):
                return gemm_func
        return None

    def __contains__(self, gemm_func: object) -> bool:
        return any(e[0] is gemm_func for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


gemm_registry = GEMMRegistry()
"""The process-wide registry quantized linear layers look their real-quant GEMM up in."""


def _forget(module: nn.Module) -> None:
    module.__dict__.pop("_real_quant_gemm_impl", None)


def enable_real_quant_gemm(model: nn.Module) -> None:
    """Mark every layer of ``model`` whose input and weight quantizers are enabled for real GEMM."""
    for module in model.modules():
        inp = getattr(module, "input_quantizer", None)
        weight = getattr(module, "weight_quantizer", None)
        if inp is not None and weight is not None and inp.is_enabled and weight.is_enabled:
            module._use_real_quant_gemm = True
            _forget(module)


def disable_real_quant_gemm(model: nn.Module) -> None:
    """Every layer of ``model`` back to its fake-quantized matmul."""
    for module in model.modules():
        if getattr(module, "_use_real_quant_gemm", False):
            module._use_real_quant_gemm = False
            _forget(module)


def is_real_quant_gemm_enabled(model: nn.Module) -> bool:
    """True when some layer of ``model`` is marked for real-quant GEMM."""
    return any(getattr(m, "_use_real_quant_gemm", False) for m in model.modules())
