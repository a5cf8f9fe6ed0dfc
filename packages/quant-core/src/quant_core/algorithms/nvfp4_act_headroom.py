"""The ``nvfp4_act_headroom`` algorithm: NVFP4 activation global amaxes with headroom above the
calibration data (`quant_core.calib.nvfp4_act_headroom`); weights by ``weight_scale_algorithm``
(``max`` or ``mse``), every other activation quantizer by max."""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.algorithms.registry import ForwardLoop, get_algorithm, register_algorithm
from quant_core.algorithms.statistics import collecting_statistics
from quant_core.calib.nvfp4_act_headroom import NVFP4ActHeadroomCalibrator
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer


def _is_nvfp4_dynamic(q: nn.Module) -> bool:
    if not isinstance(q, TensorQuantizer) or not q.is_enabled:
        return False
    fmt = q.format
    return fmt.dynamic and fmt.has_global_amax


def is_nvfp4_dynamic_input_quantizer(name: str, module: nn.Module) -> bool:
    """True for an enabled dynamic NVFP4-style input quantizer (a name ending ``input_quantizer``
    and a two-level block format whose global amax is calibrated): what this algorithm targets."""
    return name.endswith("input_quantizer") and _is_nvfp4_dynamic(module)


def swap_in_headroom_calibrators(
    model: nn.Module, *, anchor_percentile: float, upper_percentile: float, rho: float
) -> list[tuple[TensorQuantizer, Any]]:
    """Give each :func:`is_nvfp4_dynamic_input_quantizer` of ``model`` a fresh
    :class:`NVFP4ActHeadroomCalibrator` for its global amax; returns ``(quantizer, previous
    calibrator)`` pairs to restore. A :class:`SequentialQuantizer` input quantizer with an NVFP4
    stage is refused (NotImplementedError, naming it) before anything is changed: one global
    scale per tensor has no defined meaning for chained stages."""
    for name, module in model.named_modules():
        chained = name.endswith("input_quantizer") and isinstance(module, SequentialQuantizer)
        if chained and any(_is_nvfp4_dynamic(q) for q in module):
            raise NotImplementedError(
                f"nvfp4_act_headroom does not support SequentialQuantizer activation "
                f"quantizers: {name!r} chains an NVFP4 dynamic-block stage; give these "
                "modules a single activation quantizer, or calibrate with 'max'"
            )
    swapped: list[tuple[TensorQuantizer, Any]] = []
    for name, q in model.named_modules():
        if is_nvfp4_dynamic_input_quantizer(name, q):
            swapped.append((q, q._global_calibrator))
            q._global_calibrator = NVFP4ActHeadroomCalibrator(
                block_size=q.format.block_size or 16,
                anchor_percentile=anchor_percentile,
                upper_percentile=upper_percentile,
                rho=rho,
            )
    return swapped


@register_algorithm("nvfp4_act_headroom")
def nvfp4_act_headroom(
    model: nn.Module,
    forward_loop: ForwardLoop | None = None,
    anchor_percentile: float = 1.0,
    upper_percentile: float = 99.99,
    rho: float = 16384.0,
    weight_scale_algorithm: dict[str, Any] | str | None = None,
    distributed_sync: bool = True,
) -> None:
    """Calibrate weights with ``weight_scale_algorithm`` (default max), then run ``forward_loop``
    once: dynamic NVFP4 input quantizers (names ending ``input_quantizer``, as ModelOpt) get their
    global amax from :class:`NVFP4ActHeadroomCalibrator`, the other activations the running max."""
    spec = weight_scale_algorithm or {"method": "max"}
    spec = {"method": spec} if isinstance(spec, str) else dict(spec)
    method = spec.pop("method", None)
    if method not in ("max", "mse"):
        raise ValueError(f"weight_scale_algorithm must be max or mse here, got {method!r}")
    get_algorithm(method)(model, None, **spec)  # no forward loop: weights only
    if forward_loop is None:
        return
    swapped = swap_in_headroom_calibrators(
        model, anchor_percentile=anchor_percentile, upper_percentile=upper_percentile, rho=rho
    )
    try:
        with collecting_statistics(model, sync=distributed_sync):
            forward_loop(model)
    finally:
        for q, calibrator in swapped:
            q._global_calibrator = calibrator


__all__ = [
    "is_nvfp4_dynamic_input_quantizer",
    "nvfp4_act_headroom",
    "swap_in_headroom_calibrators",
]
