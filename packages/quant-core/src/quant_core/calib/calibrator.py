"""ModelOpt's calibrator base class, for user calibrators given as ``calibrator=(cls, args, kwargs)``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class _Calibrator(ABC):
    """A calibrator collects tensors and turns them into an amax.

    Subclasses implement ``collect(x)``, ``compute_amax(*args, **kwargs)`` (None before any
    tensor) and ``reset()``; a quantizer whose ``calibrator`` is ``(cls, args, kwargs)`` builds
    ``cls(*args, **kwargs)`` and calls these.
    """

    def __init__(
        self,
        num_bits: int | tuple[int, int] = 8,
        axis: int | tuple[int, ...] | None = None,
        unsigned: bool = False,
    ):
        self._num_bits, self._axis, self._unsigned = num_bits, axis, unsigned

    @abstractmethod
    def collect(self, x: torch.Tensor) -> None:
        """Fold one tensor into the statistics."""

    @abstractmethod
    def compute_amax(self, *args, **kwargs) -> torch.Tensor | None:
        """The amax from the statistics so far, or None when nothing was collected."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the statistics."""
