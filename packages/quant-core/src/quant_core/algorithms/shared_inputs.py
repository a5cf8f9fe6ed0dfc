"""Which layers read the very tensor that another layer read just before (q/k/v, gate/up).

Calibration hooks call :meth:`SharedInputs.note` from each layer's pre-forward hook; a layer whose
input is, in every batch, the tensor the group's first layer read has that layer as its source.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SharedInputs:
    """Tracks, across batches, the layer that first read each layer's input tensor."""

    def __init__(self, names: Iterable[str]) -> None:
        self._seen: dict[str, set[str | None]] = {name: set() for name in names}
        self._last: torch.Tensor | None = None
        self._owner: str | None = None

    def note(self, name: str, x: torch.Tensor) -> bool:
        """Record that ``name`` read ``x``; True when ``x`` is the tensor the previous reader read."""
        if self._last is x:
            self._seen[name].add(self._owner)
            return True
        self._seen[name].add(None)
        self._last, self._owner = x, name
        return False

    def sources(self) -> dict[str, str]:
        """Layer -> the layer that read the same tensor first, for layers that always shared it."""
        return {
            name: next(iter(seen))
            for name, seen in self._seen.items()
            if len(seen) == 1 and None not in seen
        }

    def release(self) -> None:
        """Drop the reference to the last input tensor (call when the pass is over)."""
        self._last = None
