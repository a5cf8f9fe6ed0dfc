"""ModelOpt's ``NVFP4ActHeadroomCalibrator``: an NVFP4 activation global amax with room above the
calibration data.

Max calibration puts the largest calibration block at the top of the E4M3 block-scale range, so
any larger activation later saturates. This calibrator histograms ``log2`` of every per-block amax
it sees and returns ``max(rho * anchor, upper)``: ``anchor`` the ``anchor_percentile`` of the block
amaxes (ignoring blocks below ``upper / 1e6``), ``upper`` the ``upper_percentile`` (100: the
largest block seen). Percentiles are read at histogram bin centres (``num_bins`` bins over
``[log2_min, log2_max]``), as ModelOpt does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import quant_kernels as qk
from quant_core.calib.calibrator import _Calibrator
from quant_core.diagnostics import warn

FP8_NORMAL_RANGE = qk.E4M3_MAX / 2.0 ** qk.ElementFormat.parse((4, 3)).min_normal_exponent
"""Largest ratio of two normal E4M3 block scales under one global scale (28672)."""

_ANCHOR_FLOOR = 1e6


class NVFP4ActHeadroomCalibrator(_Calibrator):
    """Global amax of an NVFP4 activation quantizer from a log2 histogram of its block amaxes."""

    def __init__(
        self,
        num_bits: int | tuple[int, int] = (2, 1),
        axis: int | tuple[int, ...] | None = None,
        unsigned: bool = False,
        *,
        block_size: int = 16,
        anchor_percentile: float = 1.0,
        upper_percentile: float = 99.99,
        rho: float = 16384.0,
        num_bins: int = 512,
        log2_min: float = -40.0,
        log2_max: float = 40.0,
    ):
        super().__init__(num_bits, axis, unsigned)
        if not 0.0 < rho < FP8_NORMAL_RANGE:
            raise ValueError(f"rho must be in (0, {FP8_NORMAL_RANGE:g}), got {rho}")
        for name, p in (
            ("anchor_percentile", anchor_percentile),
            ("upper_percentile", upper_percentile),
        ):
            if not 0.0 < p <= 100.0:
                raise ValueError(f"{name} must be in (0, 100], got {p}")
        self.block_size, self.rho = block_size, float(rho)
        self.anchor_percentile, self.upper_percentile = (
            float(anchor_percentile),
            float(upper_percentile),
        )
        self.edges = (float(log2_min), float(log2_max), int(num_bins))
        self._hist: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def _bins(self, log2: torch.Tensor) -> torch.Tensor:
        lo, hi, n = self.edges
        return ((log2 - lo) / (hi - lo) * n).floor().long().clamp(0, n - 1)

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add the per-block amaxes of ``x`` (last axis, zero-padded to whole blocks)."""
        x = x.detach()
        pad = -x.shape[-1] % self.block_size
        blocks = qk.reduce_amax(F.pad(x, (0, pad)) if pad else x, block_sizes={-1: self.block_size})
        blocks = blocks.flatten().float()
        if not torch.isfinite(blocks).all():
            raise ValueError("NVFP4ActHeadroomCalibrator: the input has NaN or infinite values")
        top = blocks.max()
        self._max = top if self._max is None else torch.maximum(self._max, top)
        positive = blocks[blocks > 0]
        counts = torch.bincount(self._bins(torch.log2(positive)), minlength=self.edges[2])
        self._hist = counts if self._hist is None else self._hist + counts

    def _percentile(self, percentile: float, floor: float = 0.0) -> float | None:
        counts = self._hist.double().clone()
        if floor > 0:
            counts[: int(self._bins(torch.tensor(floor).log2()))] = 0
        total = float(counts.sum())
        if total <= 0:
            return None
        idx = int(
            torch.searchsorted(
                counts.cumsum(0), torch.tensor(percentile / 100 * total, dtype=torch.float64)
            )
        )
        lo, hi, n = self.edges
        return 2.0 ** (lo + (min(idx, n - 1) + 0.5) / n * (hi - lo))

    @torch.no_grad()
    def compute_amax(self) -> torch.Tensor | None:
        """``max(rho * anchor, upper)`` (the largest block amax when the percentiles are empty).

        None when nothing was collected, or when every block seen was all zeros: an amax of 0
        would quantize every later input to 0, so the quantizer keeps the amax it had (a
        :class:`QuantWarning` says so).
        """
        if self._hist is None or self._max is None:
            return None
        if float(self._max) <= 0:
            warn(
                "NVFP4ActHeadroomCalibrator saw only zeros: no global amax is computed (an amax of 0 "
                "would quantize every later input to 0); calibrate with data that reaches this "
                "quantizer with non-zero values",
                stacklevel=2,
            )
            return None
        upper = (
            float(self._max)
            if self.upper_percentile >= 100
            else self._percentile(self.upper_percentile)
        )
        anchor = self._percentile(self.anchor_percentile, (upper or 0.0) / _ANCHOR_FLOOR)
        if not upper or not anchor:
            return self._max.clone()
        amax = self.rho * anchor
        if amax <= upper:
            warnings.warn(
                f"nvfp4_act_headroom: block amaxes span {upper / anchor:.1f}x, more than rho={self.rho:g}: "
                "no headroom is left and the global amax is the top of the calibrated range"
                + (
                    " (the span exceeds E4M3's normal range: reduce outliers first)"
                    if upper / anchor > FP8_NORMAL_RANGE
                    else ""
                ),
                RuntimeWarning,
                stacklevel=2,
            )
            amax = upper
        return torch.tensor(amax, dtype=torch.float32, device=self._max.device)

    def reset(self) -> None:
        """Forget the histogram."""
        self._hist = self._max = None


__all__ = ["NVFP4ActHeadroomCalibrator"]
