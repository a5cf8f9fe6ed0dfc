"""ModelOpt's ``NVFP4StaticQuantizer``: a static NVFP4 TensorQuantizer seen through its two levels.

A static NVFP4 quantizer holds one amax per block; its global (per-tensor) amax, which sets the
float32 second-level scale ``global_amax / (6 * 448)``, is the largest block amax — the one rule
``quant_kernels.nvfp4_global_amax`` that the kernels, ``compress`` and every exporter apply. This
class exposes that value as ``global_amax``; ModelOpt also lets a global amax differ from the
block amaxes, which here is refused by name (the exported checkpoint would disagree with the
simulated model otherwise).
"""

from __future__ import annotations

import torch

import quant_kernels as qk
from quant_core.nn.block_scale import StaticBlockScaleQuantizer


class NVFP4StaticQuantizer(StaticBlockScaleQuantizer):
    """A TensorQuantizer in static NVFP4 (E2M1 blocks with E4M3 scales and a calibrated block amax)."""

    _needs = (
        "a static NVFP4 TensorQuantizer (num_bits=(2, 1), block_sizes with scale_bits=(4, 3), "
        "type static)"
    )

    @classmethod
    def _takes(cls, fmt: qk.QuantFormat) -> bool:
        return fmt.has_global_amax and not fmt.dynamic

    @property
    def global_amax(self) -> torch.Tensor | None:
        """The global amax (the largest block amax), or None before calibration."""
        amax = self.amax
        return None if amax is None else qk.nvfp4_global_amax(block_amax=amax.detach())

    @global_amax.setter
    def global_amax(self, value: torch.Tensor | float | None) -> None:
        if value is None:
            return
        value = torch.as_tensor(value, dtype=torch.float32).reshape(())
        current = self.global_amax
        if current is None or not torch.equal(current.cpu(), value.cpu()):
            raise ValueError(
                f"global_amax={float(value)} differs from the largest block amax "
                f"({None if current is None else float(current)}) of {self._name or 'quantizer'}: "
                "a static NVFP4 quantizer's global amax is its largest block amax here "
                "(qk.nvfp4_global_amax); set the block amaxes (`amax`) instead"
            )


__all__ = ["NVFP4StaticQuantizer"]
