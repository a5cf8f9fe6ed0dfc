"""Max calibration: the running maximum of |x| per tensor, channel or block."""

from __future__ import annotations

import torch

import quant_kernels as qk


def reduce_amax(
    x: torch.Tensor,
    axis: int | tuple[int, ...] | None = None,
    block_sizes: dict[int, int | None] | None = None,
) -> torch.Tensor:
    """``qk.reduce_amax`` of ``x`` detached from autograd (calibration never builds a graph)."""
    return qk.reduce_amax(x.detach(), axis=axis, block_sizes=block_sizes)


class MaxCalibrator:
    """Collects the running amax of every tensor it sees, with the quantizer's granularity."""

    def __init__(
        self,
        num_bits: int | tuple[int, int] = 8,
        axis: int | tuple[int, ...] | None = None,
        unsigned: bool = False,
        track_amax: bool = False,
        *,
        block_sizes: dict[int, int | None] | None = None,
    ):
        """ModelOpt's signature; ``axis`` keeps one amax per index, ``track_amax`` records each batch's amax."""
        self.num_bits, self.axis, self.unsigned = num_bits, axis, unsigned
        self.block_sizes = block_sizes or None
        self._amax: torch.Tensor | None = None
        self._amaxs: list[torch.Tensor] | None = [] if track_amax else None

    @property
    def amaxs(self) -> list[torch.Tensor] | None:
        """The amax of each batch collected (with ``track_amax``), else None."""
        return self._amaxs

    def collect(self, x: torch.Tensor) -> None:
        """Fold one tensor into the running amax (shape mismatches between batches are an error)."""
        amax = reduce_amax(x, axis=self.axis, block_sizes=self.block_sizes)
        if self._amaxs is not None:
            self._amaxs.append(amax.cpu())
        if self._amax is None:
            self._amax = amax.clone()
        elif self._amax.shape != amax.shape:
            raise ValueError(
                f"amax shape changed between calibration batches ({tuple(self._amax.shape)} vs "
                f"{tuple(amax.shape)}); per-channel/block activation quantizers need fixed dims"
            )
        else:
            torch.maximum(self._amax, amax, out=self._amax)

    def compute_amax(self) -> torch.Tensor | None:
        """The amax so far, or None when nothing was collected."""
        return self._amax

    def reset(self) -> None:
        """Forget everything collected."""
        self._amax = None
        if self._amaxs is not None:
            self._amaxs = []
