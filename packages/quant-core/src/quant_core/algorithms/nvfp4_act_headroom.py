"""The ``nvfp4_act_headroom`` algorithm: NVFP4 activation global amaxes with headroom above the
calibration data (`quant_core.calib.nvfp4_act_headroom`); weights by ``weight_scale_algorithm``
(``max`` or ``mse``), every other activation quantizer by max."""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.algorithms.registry import ForwardLoop, get_algorithm, register_algorithm
from quant_core.algorithms.statistics import collecting_statistics
from quant_core.calib.nvfp4_act_headroom import NVFP4ActHeadroomCalibrator
from quant_core.nn.tensor_quantizer import TensorQuantizer


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
    options = {
        "anchor_percentile": anchor_percentile,
        "upper_percentile": upper_percentile,
        "rho": rho,
    }
    swapped = []
    for name, q in model.named_modules():
        if not (isinstance(q, TensorQuantizer) and name.endswith("input_quantizer")):
            continue
        fmt = q.format
        if q.is_enabled and fmt.dynamic and fmt.has_global_amax:
            block = fmt.block_size or 16
            swapped.append((q, q._global_calibrator))
            q._global_calibrator = NVFP4ActHeadroomCalibrator(block_size=block, **options)
    try:
        with collecting_statistics(model, sync=distributed_sync):
            forward_loop(model)
    finally:
        for q, calibrator in swapped:
            q._global_calibrator = calibrator


__all__ = ["nvfp4_act_headroom"]
