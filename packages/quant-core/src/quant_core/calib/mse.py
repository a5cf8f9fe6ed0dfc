"""MseCalibrator (ModelOpt's signature): amax chosen from multiples of an initial amax by least error."""

from __future__ import annotations

from collections.abc import Callable

import torch


class MseCalibrator:
    """Tries ``amax * m`` for m in ``start_multiplier .. stop_multiplier`` (step ``step_size``) on every
    tensor collected and keeps, per tensor or per ``axis`` index, the candidate of least summed error.

    ``quant_func(x, amax)`` fake-quantizes with a candidate amax; ``error_func(x, xq)`` defaults to
    the squared error.
    """

    def __init__(
        self,
        amax: torch.Tensor,
        axis: int | tuple[int, ...] | list[int] | None = None,
        step_size: float = 0.1,
        start_multiplier: float = 0.25,
        stop_multiplier: float = 4.0,
        quant_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        error_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        if quant_func is None:
            raise ValueError("MseCalibrator needs quant_func(x, amax) to fake-quantize candidates")
        if step_size <= 0 or not 0 < start_multiplier <= stop_multiplier:
            raise ValueError(
                f"need step_size > 0 and 0 < start_multiplier <= stop_multiplier, got "
                f"{step_size}, {start_multiplier}, {stop_multiplier}"
            )
        self.amax = torch.as_tensor(amax).detach().float()
        self.axis = axis
        count = round((stop_multiplier - start_multiplier) / step_size) + 1
        self.multipliers = [start_multiplier + i * step_size for i in range(count)]
        self.quant_func = quant_func
        self.error_func = error_func or (lambda x, xq: (x - xq) ** 2)
        self._losses: list[torch.Tensor] | None = None

    @property
    def _initial_amax(self) -> torch.Tensor:
        """The amax the candidates multiply (ModelOpt's name)."""
        return self.amax

    def _reduce(self, err: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return err.sum()
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        kept = {a % err.dim() for a in axes}
        return err.sum(dim=[d for d in range(err.dim()) if d not in kept], keepdim=True)

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add each candidate's error on ``x`` to its running sum."""
        losses = [
            self._reduce(self.error_func(x.float(), self.quant_func(x, self.amax * m).float()))
            for m in self.multipliers
        ]
        if self._losses is None:
            self._losses = losses
        else:
            self._losses = [a + b for a, b in zip(self._losses, losses)]

    def compute_amax(self, verbose: bool = False) -> torch.Tensor | None:
        """The candidate amax of least error (per ``axis`` index), or None when nothing was collected."""
        if self._losses is None:
            return None
        stacked = torch.stack(self._losses)
        best = torch.argmin(stacked, dim=0)
        factors = torch.tensor(self.multipliers, dtype=torch.float32)[best]
        amax = (
            self.amax * factors.reshape(self.amax.shape)
            if self.axis is not None
            else self.amax * factors
        )
        if verbose:
            print(
                f"MseCalibrator: best amax / initial amax = {(amax / self.amax).flatten().tolist()}"
            )
        return amax

    def reset(self) -> None:
        """Forget the collected errors."""
        self._losses = None
