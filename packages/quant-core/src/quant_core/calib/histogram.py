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
        self,
        method: Method | None = None,
        *,
        stride: int | None = None,
        start_bin: int | None = None,
        percentile: float | None = None,
    ) -> torch.Tensor | None:
        """The amax chosen by ``method`` (default: this calibrator's), or None when nothing was collected.

        ``percentile`` (in [0, 100]) overrides this calibrator's for ``"percentile"``.
        ``start_bin`` and ``stride`` (ModelOpt's keywords) set the searched bins for ``"mse"``
        (candidate amaxes: the centres of bins ``start_bin, start_bin + stride, ...``) and
        ``"entropy"`` (thresholds of ``start_bin, start_bin + stride, ...`` bins, ``start_bin`` at
        least the number of quantization levels); left out, quant's own spacing is used.
        """
        choosers = {"percentile": self._percentile, "mse": self._mse, "entropy": self._entropy}
        method = method or self.method
        if method not in choosers:
            raise ValueError(f"histogram method must be percentile, mse or entropy, got {method!r}")
        if percentile is not None and (
            isinstance(percentile, bool) or not 0 <= float(percentile) <= 100
        ):
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if stride is not None and (
            isinstance(stride, bool) or not isinstance(stride, int) or stride < 1
        ):
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if start_bin is not None and (
            isinstance(start_bin, bool)
            or not isinstance(start_bin, int)
            or not 0 <= start_bin < self.num_bins
        ):
            raise ValueError(
                f"start_bin must be an int in [0, {self.num_bins}) (num_bins), got {start_bin!r}"
            )
        if self._hist is None or self._hist.sum() == 0:
            return None
        if method == "percentile":
            value = self._percentile(self.percentile if percentile is None else float(percentile))
        else:
            value = choosers[method](start_bin, stride)
        return torch.tensor(float(value), dtype=torch.float32)

    def _percentile(self, percentile: float | None = None) -> float:
        percentile = self.percentile if percentile is None else percentile
        cdf = torch.cumsum(self._hist, 0) / self._hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100, dtype=torch.float64)))
        return (min(idx, self.num_bins - 1) + 1) * self._max / self.num_bins

    def _mse(self, start_bin: int | None = None, stride: int | None = None) -> float:
        """Pick the candidate amax minimizing the histogram-weighted quantization MSE (one batched call)."""
        centres = self._centres().float()
        if start_bin is None and stride is None:  # quant's spacing: bin edges from num_bins / 16
            start = max(1, self.num_bins // 16)
            candidates = (
                torch.arange(start, self.num_bins + 1, max(1, self.num_bins // 256)).float()
            ) * (self._max / self.num_bins)
        else:  # ModelOpt's: bin centres from start_bin in steps of stride
            candidates = centres[start_bin or 0 :: stride or 1]
        grid = centres.expand(len(candidates), -1).contiguous()
        fq = qk.fake_quantize(
            grid, num_bits=self.num_bits, amax=candidates[:, None], unsigned=self.unsigned
        )
        err = ((fq.double() - grid.double()) ** 2 * self._hist).sum(1)
        return float(candidates[int(torch.argmin(err))])

    def _entropy(self, start_bin: int | None = None, stride: int | None = None) -> float:
        """TensorRT's KL-divergence threshold search over the histogram."""
        element = qk.ElementFormat.parse(self.num_bits, unsigned=self.unsigned)
        levels = 2 ** (element.bits - 1) if element.is_int else 128  # FP: as for 8-bit codes
        hist = self._hist
        if start_bin is not None and start_bin < levels:
            raise ValueError(
                f"entropy start_bin must be at least the {levels} quantization levels of "
                f"num_bits={self.num_bits!r}, got {start_bin}"
            )
        if self.num_bins <= levels:
            return self._max
        start = levels if start_bin is None else start_bin
        if stride is None:
            stride = max(1, (self.num_bins - levels) // 128) if start_bin is None else 1
        best, best_i = float("inf"), self.num_bins
        for i in range(start, self.num_bins + 1, stride):
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


def calibrate_weights(
    model: torch.nn.Module,
    method: str = "percentile",
    perchannel: bool = True,
    percentile: float = 99.99,
    num_bins: int = 2048,
) -> None:
    """Set the weight amax of every quantized module of ``model`` from a histogram of its weight
    (ModelOpt's ``calib.calibrate_weights``), ignoring the quantizers' own calibrators.

    ``method``: ``"percentile"`` (of |w|, ``percentile`` in [0, 100]), ``"mse"`` or ``"max"``.
    ``perchannel``: one amax per output channel (axis 0; axis 1 for transposed convolutions),
    which needs a quantizer with that ``axis``; else one per tensor. Block-wise and sequential
    weight quantizers are refused by name.
    """
    if method not in ("percentile", "mse", "max"):
        raise ValueError(
            f"calibrate_weights: method must be percentile, mse or max, got {method!r}"
        )
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        # (a SequentialQuantizer is an nn.Sequential of TensorQuantizers; calib sits below nn)
        if isinstance(quantizer, torch.nn.Sequential) or quantizer.block_sizes:
            raise ValueError(
                f"calibrate_weights: {name}.weight_quantizer is sequential or block-wise; it "
                "calibrates per-tensor and per-channel weight quantizers only"
            )
        transposed = isinstance(module, torch.nn.modules.conv._ConvTransposeNd)
        axis = (1 if transposed else 0) if perchannel else None
        if axis is not None and quantizer.axis not in (axis, axis - weight.dim()):
            raise ValueError(
                f"calibrate_weights: {name}.weight_quantizer has axis={quantizer.axis!r} but "
                f"perchannel=True gives one amax per channel of axis {axis}; set the quantizer's "
                "axis or pass perchannel=False"
            )
        w = weight.detach().float()
        slices = [w] if axis is None else list(w.movedim(axis, 0))
        amaxes = []
        for piece in slices:
            if method == "max":
                amaxes.append(piece.abs().max())
                continue
            histogram = HistogramCalibrator(
                num_bits=quantizer.num_bits,
                unsigned=quantizer.unsigned,
                num_bins=num_bins,
                method=method,  # type: ignore[arg-type]
            )
            histogram.collect(piece)
            amax = histogram.compute_amax(percentile=percentile if method == "percentile" else None)
            amaxes.append(torch.zeros(()) if amax is None else amax)
        amax = torch.stack([a.reshape(()) for a in amaxes])
        if axis is not None:
            shape = [1] * w.dim()
            shape[axis] = w.shape[axis]
            amax = amax.reshape(shape)
        else:
            amax = amax.reshape(())
        quantizer.amax = amax.to(weight.device)


__all__ = ["HistogramCalibrator", "calibrate_weights"]
