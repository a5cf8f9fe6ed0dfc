"""One weight quantizer's MSE calibrator (ModelOpt 0.47's ``model_calib._make_weight_mse_calibrator``)
and the registry of calibrator factories for custom backends under ``fp8_scale_sweep``.

The calibrator is a :class:`quant_core.calib.MseCalibrator` that collects the weight as it is
(``(rows, cols)``) and scores each candidate amax (the calibrated amax times a multiplier) by
the error of the quantizer's own fake quantization with that amax, custom backends included,
summed per amax entry: per tensor, per output channel, or per block of the last axis.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor, nn

from quant_core.algorithms._blocks import to_blocks
from quant_core.calib import MseCalibrator
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "FP8_SWEEP_CALIBRATORS",
    "CalibratorFactory",
    "make_weight_mse_calibrator",
    "register_fp8_sweep_calibrator",
]

CalibratorFactory = Callable[[Tensor, "int | tuple | list | None", Callable[..., Tensor]], object]
"""``factory(amax, axis, quant_func) -> calibrator`` for one weight quantizer."""

FP8_SWEEP_CALIBRATORS: dict[str, CalibratorFactory] = {}
"""Calibrator factories by custom backend name, used when ``fp8_scale_sweep`` is True."""


def register_fp8_sweep_calibrator(backend: str, calibrator_factory: CalibratorFactory) -> None:
    """Use ``calibrator_factory(amax, axis, quant_func)`` for weight quantizers whose ``backend``
    is ``backend`` when a weight MSE calibrator is made with ``fp8_scale_sweep=True``."""
    FP8_SWEEP_CALIBRATORS[backend] = calibrator_factory


def _quant_with_amax(quantizer: TensorQuantizer, x: Tensor, amax: Tensor) -> Tensor:
    """``quantizer``'s fake quantization of ``x`` with ``amax`` in place of its own (restored)."""
    learned = "_amax" in quantizer._parameters
    store = quantizer._parameters if learned else quantizer._buffers
    saved = store["_amax"]
    value = amax.to(saved).reshape(saved.shape)
    store["_amax"] = nn.Parameter(value, requires_grad=False) if learned else value
    try:
        return quantizer.fake_quantize(x)
    finally:
        store["_amax"] = saved


def _layout(quantizer: TensorQuantizer) -> tuple[int | tuple[int, int] | None, int | None]:
    """(calibrator axis, block size along the last axis or None) for the quantizer's amax."""
    fmt = quantizer.format
    if fmt.sized_blocks:
        if list(fmt.sized_blocks) != [-1] or dict(fmt.blocks) != fmt.sized_blocks:
            raise ValueError(
                f"weight MSE calibration takes blocks along the last axis only, got {fmt.label}"
            )
        return (0, 1), fmt.sized_blocks[-1]
    if fmt.axis is None:
        return None, None
    if fmt.axis in (0, -2):
        return 0, None
    raise ValueError(f"weight MSE calibration takes axis 0 or None, got axis={fmt.axis}")


def make_weight_mse_calibrator(
    weight_quantizer: nn.Module,
    step_size: float,
    start_multiplier: float,
    stop_multiplier: float,
    fp8_scale_sweep: bool,
    error_func: Callable[[Tensor, Tensor], Tensor] | None = None,
    hessian: Tensor | None = None,
) -> object | None:
    """The MSE calibrator for one weight quantizer, or None when it has none to search: not an
    enabled, calibrated, static non-MX TensorQuantizer.

    Candidates are ``amax * m`` for ``m`` from ``start_multiplier`` to ``stop_multiplier`` in steps of
    ``step_size``; ``error_func(x, xq)`` (elementwise, default squared error) is summed per amax
    entry. With ``fp8_scale_sweep``, only quantizers whose custom ``backend`` has a factory
    registered (:func:`register_fp8_sweep_calibrator`) get one (None with a warning when an
    ``error_func`` is given: factories take none); a static NVFP4 quantizer is refused by name
    (ModelOpt's E4M3 scale sweep is not implemented here); others get None. ``hessian`` (ModelOpt's
    fast-path metric) is not used: ``error_func`` carries the weighting.
    """
    q = weight_quantizer
    if (
        not isinstance(q, TensorQuantizer)
        or not q.is_enabled
        or q.is_dynamic
        or q.is_mx_format
        or q.amax is None
    ):
        return None
    del hessian
    axis, block = _layout(q)
    amax = q.amax.detach().float().clone()

    def quant_func(x: Tensor, candidate: Tensor) -> Tensor:
        return _quant_with_amax(q, x, candidate)

    if fp8_scale_sweep:
        backend = q.attribute_config.backend
        factory = FP8_SWEEP_CALIBRATORS.get(backend) if backend is not None else None
        if factory is not None:
            if error_func is not None:
                warnings.warn(
                    f"backend {backend!r} takes no custom error function; this weight quantizer "
                    "is left at its calibrated amax",
                    stacklevel=2,
                )
                return None
            return factory(amax, axis, quant_func)
        if backend is None and q.format.has_global_amax:
            raise ValueError(
                "fp8_scale_sweep for static NVFP4 weights (sweeping the E4M3 block scales) is not "
                "supported by quant-core; use the multiplier sweep (fp8_scale_sweep=False)"
            )
        return None
    base = error_func or (lambda x, xq: (x - xq) ** 2)
    if block is None:
        err = base
    else:
        amax = amax.reshape(-1, amax.shape[-1]) if amax.dim() > 1 else amax.reshape(1, -1)

        def err(x: Tensor, xq: Tensor) -> Tensor:
            e = base(x, xq)
            return to_blocks(e.reshape(-1, e.shape[-1]), block).sum(-1)

    return MseCalibrator(amax, axis, step_size, start_multiplier, stop_multiplier, quant_func, err)
