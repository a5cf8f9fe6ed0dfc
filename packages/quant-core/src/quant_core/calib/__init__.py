"""Calibrators: how a static quantizer turns the tensors it sees into an amax."""

from __future__ import annotations

from typing import Any

from quant_core.calib.calibrator import _Calibrator
from quant_core.calib.histogram import HistogramCalibrator, calibrate_weights
from quant_core.calib.max import MaxCalibrator, reduce_amax
from quant_core.calib.mse import MseCalibrator
from quant_core.calib.nvfp4_act_headroom import NVFP4ActHeadroomCalibrator

Calibrator = MaxCalibrator | HistogramCalibrator | _Calibrator


def make_calibrator(attrs: Any, block_sizes: dict[int, int | None] | None) -> Calibrator:
    """The calibrator named by a quantizer's ``calibrator`` attribute ("histogram" means entropy),
    or ``cls(*args, **kwargs)`` for a constructor ``(cls, args, kwargs)``."""
    if not isinstance(attrs.calibrator, str):
        cls, args, kwargs = attrs.calibrator
        return cls(*args, **kwargs)
    if attrs.calibrator == "max":
        return MaxCalibrator(axis=attrs.axis, block_sizes=block_sizes)
    method = "entropy" if attrs.calibrator == "histogram" else attrs.calibrator
    return HistogramCalibrator(method=method, num_bits=attrs.num_bits, unsigned=attrs.unsigned)


__all__ = [
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "NVFP4ActHeadroomCalibrator",
    "_Calibrator",
    "calibrate_weights",
    "make_calibrator",
    "reduce_amax",
]
