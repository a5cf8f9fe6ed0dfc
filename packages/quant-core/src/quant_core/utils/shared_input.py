"""ModelOpt 0.47's ``utils.shared_input.SharedWeightGlobalAmaxState``: one NVFP4 global amax held
once and shared, as the very same tensor, by the static NVFP4 weight quantizers of layers an engine
fuses (q/k/v, gate/up), so that an in-place update of it reaches every member.

Here the state ties the quantizers it is given (`tie_member_quantizer`); which layers form a
group is found by calibration itself (:mod:`quant_core.input_groups`), not by ModelOpt's
``attach`` patterns.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SharedWeightGlobalAmaxState"]


class SharedWeightGlobalAmaxState(nn.Module):
    """The canonical shared weight global amax (float32, 0-d) of one group of quantizers."""

    def __init__(self) -> None:
        super().__init__()
        # not persistent: each tied quantizer saves it as its own ``_global_amax``
        self.register_buffer("_global_amax", None, persistent=False)
        self._members: list[nn.Module] = []

    @property
    def global_amax(self) -> torch.Tensor | None:
        """The shared global amax, or None before it is set."""
        return self._buffers.get("_global_amax")

    @global_amax.setter
    def global_amax(self, value: torch.Tensor | float | None) -> None:
        if value is None:
            self._buffers["_global_amax"] = None
            return
        value = torch.as_tensor(value).detach().to(torch.float32).reshape(())
        current = self.global_amax
        if current is not None:
            current.copy_(value)  # in place: the tied quantizers hold this tensor
        else:
            self._buffers["_global_amax"] = value.clone()

    def tie_member_quantizer(self, quantizer: nn.Module) -> bool:
        """Make ``quantizer``'s global amax this state's tensor; False (nothing tied) when the
        state has no value yet or the quantizer has no ``global_amax``. The quantizer checks the
        value (a calibrated static NVFP4 quantizer, at least its largest block amax)."""
        shared = self.global_amax
        if shared is None or not hasattr(quantizer, "global_amax"):
            return False
        quantizer.global_amax = shared  # validated by the quantizer's own setter
        quantizer._buffers["_global_amax"] = shared
        if not any(m is quantizer for m in self._members):
            self._members.append(quantizer)
        return True

    @property
    def member_quantizers(self) -> tuple[nn.Module, ...]:
        """The quantizers tied so far, in tying order."""
        return tuple(self._members)
