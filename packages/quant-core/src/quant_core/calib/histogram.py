"""Histogram calibration: amax chosen from a histogram of |x| by percentile, MSE or entropy (KL)."""

from __future__ import annotations

from typing import Literal

import torch

import quant_kernels as qk

Method = Literal["percentile", "mse", "entropy"]


class HistogramCalibrator:
    """Collects a histogram of |x| (per tensor) and picks amax by percentile, MSE or entropy."""

    def __init__(
        self,
        num_bits: int | tuple[int, int] = 8,
        axis: int | tuple[int, ...] | None = None,
        unsigned: bool = False,
        num_bins: int = 2048,
        grow_method: str | None = None,
        skip_zeros: bool = False,
        torch_hist: bool = True,
        *,
        method: Method = "entropy",
        percentile: float = 99.99,
    ):
        """ModelOpt's signature plus the default ``method`` / ``percentile`` used by ``compute_amax()``.

        Per-tensor only (``axis=None``); ``grow_method`` and ``torch_hist`` pick ModelOpt's histogram
        implementation and have no effect here (the range always grows by re-binning).
        """
        if axis is not None:
            raise ValueError(f"HistogramCalibrator is per-tensor only, got axis={axis!r}")
        if method not in ("percentile", "mse", "entropy"):
            raise ValueError(f"histogram method must be percentile, mse or entropy, got {method!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.method, self.num_bits, self.unsigned = method, num_bits, unsigned
        self.num_bins, self.percentile, self.skip_zeros = num_bins, percentile, skip_zeros
        self._hist: torch.Tensor | None = None
        self._max = 0.0

    def collect(self, x: torch.Tensor) -> None:
        """Add |x| to the histogram, widening its range (and re-binning) when x exceeds it."""
        a = x.detach().abs().float().flatten()
        a = a[torch.isfinite(a) & (a != 0)] if self.skip_zeros else a[torch.isfinite(a)]
        if a.numel() == 0:
            return
        new_max = float(a.max())
        self.rebin(new_max if new_max > 0 or self._hist is not None else 1.0)
        self._hist += torch.histc(a.cpu(), bins=self.num_bins, min=0.0, max=self._max).double()

    def rebin(self, new_max: float) -> None:
        """Widen the histogram's range to ``[0, new_max]`` (no-op when it already covers it),
        moving the old counts to the new bins by their bin centres; an empty calibrator starts
        an empty histogram on that range."""
        if self._hist is None:
            self._max = new_max
            self._hist = torch.zeros(self.num_bins, dtype=torch.float64)
        elif new_max > self._max:
            centres = (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) * (
                self._max / self.num_bins
            )
            idx = (centres / new_max * self.num_bins).long().clamp(max=self.num_bins - 1)
            wider = torch.zeros_like(self._hist).index_add_(0, idx, self._hist)
            self._hist, self._max = wider, new_max

    def _centres(self) -> torch.Tensor:
        return (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) * (
            self._max / self.num_bins
        )

    def compute_amax(
        self, method: Method | None = None, *, percentile: float | None = None
    ) -> torch.Tensor | None:
        """The amax chosen by ``method`` (default: this calibrator's), or None when nothing was collected."""
        if self._hist is None or self._hist.sum() == 0:
            return None
        choosers = {"percentile": self._percentile, "mse": self._mse, "entropy": self._entropy}
        method = method or self.method
        if method not in choosers:
            raise ValueError(f"histogram method must be percentile, mse or entropy, got {method!r}")
        saved = self.percentile
        self.percentile = saved if percentile is None else percentile
        try:
            return torch.tensor(float(choosers[method]()), dtype=torch.float32)
        finally:
            self.percentile = saved

    def _percentile(self) -> float:
        cdf = torch.cumsum(self._hist, 0) / self._hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return (min(idx, self.num_bins - 1) + 1) * self._max / self.num_bins

    def _mse(self) -> float:
        """Pick the candidate amax minimizing the histogram-weighted quantization MSE (one batched call)."""
        centres = self._centres().float()
        start = max(1, self.num_bins // 16)
        candidates = (
            torch.arange(start, self.num_bins + 1, max(1, self.num_bins // 256)).float()
        ) * (self._max / self.num_bins)
        grid = centres.expand(len(candidates), -1).contiguous()
        fq = qk.fake_quantize(
            grid, num_bits=self.num_bits, amax=candidates[:, None], unsigned=self.unsigned
        )
        err = ((fq.double() - grid.double()) ** 2 * self._hist).sum(1)
        return float(candidates[int(torch.argmin(err))])

    def _entropy(self) -> float:
        """TensorRT's KL-divergence threshold search over the histogram."""
        element = qk.ElementFormat.parse(self.num_bits, unsigned=self.unsigned)
        levels = 2 ** (element.bits - 1) if element.is_int else 128  # FP: as for 8-bit codes
        hist = self._hist
        if self.num_bins <= levels:
            return self._max
        stride = max(1, (self.num_bins - levels) // 128)
        best, best_i = float("inf"), self.num_bins
        for i in range(levels, self.num_bins + 1, stride):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()
            nonzero = hist[:i] > 0
            # Merge the i bins into `levels` groups, spread each group's mass over its non-empty bins.
            group = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, hist[:i])
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero.double())
            q = torch.where(nonzero, mass[group] / count[group].clamp(min=1), torch.zeros_like(p))
            p_n, q_n = p / p.sum(), q / q.sum().clamp(min=1e-30)
            mask = p_n > 0
            kl = float((p_n[mask] * torch.log(p_n[mask] / q_n[mask].clamp(min=1e-30))).sum())
            if kl < best:
                best, best_i = kl, i
        return (best_i + 0.5) * self._max / self.num_bins

    def reset(self) -> None:
        """Forget the histogram."""
        self._hist, self._max = None, 0.0
