"""The ``lsq`` algorithm (learned step size, ModelOpt 0.47's ``model_calib.lsq``): calibrate the
weight scales with ``scale_algorithm`` (``mse`` by default, or ``max`` / ``local_hessian``), then
put every static block weight quantizer in LSQ mode (:mod:`quant_core.nn.lsq`), ready for training."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from quant_core.algorithms.registry import ForwardLoop, get_algorithm, register_algorithm
from quant_core.algorithms.statistics import weight_quantizers
from quant_core.diagnostics import QuantWarning
from quant_core.nn.lsq import lsq_unsupported_reason

SCALE_ALGORITHMS = ("mse", "max", "local_hessian")


@register_algorithm("lsq")
def lsq(
    model: nn.Module,
    forward_loop: ForwardLoop | None = None,
    scale_algorithm: dict[str, Any] | str | None = None,
    learnable_amax: list[str] | str = ("post",),
    tied_amax: bool = False,
    quantize_pre_scale: bool = True,
) -> None:
    """Run ``scale_algorithm`` (with ``forward_loop``), then `TensorQuantizer.enable_lsq` on each
    enabled, calibrated static weight quantizer with blocks along the last axis (others are left
    as calibrated; a warning when there is none)."""
    spec = scale_algorithm or {"method": "mse"}
    spec = {"method": spec} if isinstance(spec, str) else dict(spec)
    method = spec.pop("method", None)
    if method not in SCALE_ALGORITHMS:
        raise ValueError(f"lsq scale_algorithm must be one of {SCALE_ALGORITHMS}, got {method!r}")
    get_algorithm(method)(model, forward_loop, **spec)
    learners = [q for q in weight_quantizers(model) if lsq_unsupported_reason(q) is None]
    for quantizer in learners:
        quantizer.enable_lsq(
            learnable_amax=learnable_amax,
            tied_amax=tied_amax,
            quantize_pre_scale=quantize_pre_scale,
        )
    if not learners:
        warnings.warn(
            "lsq found no enabled static block weight quantizer (e.g. NVFP4 or INT4 with "
            "block_sizes {-1: 16, 'type': 'static'}); nothing will learn its scales",
            QuantWarning,
            stacklevel=2,
        )
