"""Calibrators: how a static quantizer turns the tensors it sees into an amax."""

from __future__ import annotations

from typing import Any

from quant_core.calib.histogram import HistogramCalibrator
from quant_core.calib.max import MaxCalibrator, reduce_amax
from quant_core.calib.mse import MseCalibrator

Calibrator = MaxCalibrator | HistogramCalibrator


def make_calibrator(attrs: Any, block_sizes: dict[int, int | None] | None) -> Calibrator:
    """The calibrator named by a quantizer's ``calibrator`` attribute ("histogram" means entropy)."""
    if attrs.calibrator == "max":
        return MaxCalibrator(axis=attrs.axis, block_sizes=block_sizes)
    method = "entropy" if attrs.calibrator == "histogram" else attrs.calibrator
    return HistogramCalibrator(method=method, num_bits=attrs.num_bits, unsigned=attrs.unsigned)


__all__ = [
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "make_calibrator",
    "reduce_amax",
]
