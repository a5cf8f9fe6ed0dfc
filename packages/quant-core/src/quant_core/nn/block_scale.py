"""Static block quantizers (ModelOpt 0.47's ``StaticBlockScaleQuantizer``) and the block-scale
helpers ModelOpt names beside it.

A static block quantizer holds one calibrated amax per block (INT or FP elements) and quantizes
block ``b`` with the scale ``amax_b / M`` (``M`` the element grid's largest magnitude). With E4M3
block scales (NVFP4) that scale is itself rounded under a per-tensor global scale; the smallest
positive E4M3 value is then the floor a block scale can keep (``FP8_E4M3_MIN_POSITIVE``).
"""

from __future__ import annotations

import torch

import quant_kernels as qk
from quant_core.nn.tensor_quantizer import TensorQuantizer

FP8_E4M3_MIN_POSITIVE = torch.finfo(torch.float8_e4m3fn).smallest_normal / 2**3
"""The smallest positive E4M3 value, ``2**-9`` (the smallest subnormal)."""


def amax_to_scale(
    amax: torch.Tensor, max_bound: float, min_value: float | torch.Tensor = 1e-8
) -> torch.Tensor:
    """Per-block scale ``amax / max_bound`` in float32; a scale at or below ``min_value`` becomes
    ``min_value`` (so that dividing by it never divides by zero)."""
    scale = amax.float() / max_bound
    return torch.where(scale <= min_value, min_value, scale)


class StaticBlockScaleQuantizer(TensorQuantizer):
    """A TensorQuantizer in a static block format: one calibrated amax per block (INT or FP)."""

    _needs = "a static block TensorQuantizer (block_sizes like {-1: 16, 'type': 'static'})"
    """What :meth:`from_tensor_quantizer` takes, for its error message."""

    @classmethod
    def _takes(cls, fmt: qk.QuantFormat) -> bool:
        """Whether a quantizer in ``fmt`` can become this class."""
        return not fmt.dynamic and bool(fmt.sized_blocks)

    @classmethod
    def from_tensor_quantizer(
        cls, tq: TensorQuantizer, global_amax: torch.Tensor | float | None = None
    ) -> StaticBlockScaleQuantizer:
        """Turn ``tq`` into this class in place and return it; ``global_amax``, when given,
        becomes its `global_amax` (NVFP4 only; the quantizer's setter checks it)."""
        if not isinstance(tq, TensorQuantizer) or not cls._takes(tq.format):
            raise ValueError(f"{cls.__name__} needs {cls._needs}, got {tq!r}")
        tq.__class__ = cls
        if global_amax is not None:
            tq.global_amax = global_amax
        return tq

    @property
    def _quant_max_bound(self) -> float:
        """The element grid's largest magnitude ``M`` (7 for narrow INT4, 6 for E2M1)."""
        return float(self.format.bounds[1])

    @property
    def has_quantized_block_scale(self) -> bool:
        """True when the block scales are rounded to a low-precision format (E4M3, E8M0)."""
        return self.format.scale_mode is not qk.ScaleMode.FLOAT32


__all__ = ["FP8_E4M3_MIN_POSITIVE", "StaticBlockScaleQuantizer", "amax_to_scale"]
