"""ModelOpt's ``NVFP4QTensor``: E2M1 codes packed two per byte, E4M3 per-block scales and a float32
per-tensor scale, computed by ``quant_kernels.quantize_to_codes`` (the NVFP4 row of the format
table; the global amax by ``qk.nvfp4_global_amax``), so ``dequantize(quantize(x))`` equals the
fake quantization ``TensorQuantizer`` and export apply.

ModelOpt's names: ``weights_scaling_factor`` is the per-block E4M3 scale, ``weights_scaling_factor_2``
the per-tensor ``global_amax / (6 * 448)``; ``dequantize`` takes them as ``scale`` and
``double_scale`` with ``block_sizes={-1: block_size}``.
"""

from __future__ import annotations

from typing import Any

import torch

import quant_kernels as qk
from quant_core.qtensor.base_qtensor import BaseQuantizedTensor

_E2M1 = qk.ElementFormat.parse((2, 1))
_GLOBAL_DIVISOR = qk.E2M1_MAX * qk.E4M3_MAX  # 6 * 448


def _codes(
    input: torch.Tensor,
    block_size: int,
    per_block_scale: torch.Tensor | None,
    scale_2: torch.Tensor | None,
) -> qk.QuantizedTensor:
    """NVFP4 codes of ``input`` (blocks along the last axis). Given scales enter as the amaxes they
    stand for (``scale * 6 * scale_2`` per block, ``scale_2 * 6 * 448`` per tensor); rounding the
    block scale to E4M3 then gives the given E4M3 scale back."""
    if block_size <= 0 or input.shape[-1] % block_size:
        raise ValueError(
            f"NVFP4 needs a positive block size dividing the last dimension {input.shape[-1]}, "
            f"got {block_size}"
        )
    global_amax = None if scale_2 is None else scale_2.float().reshape(()) * _GLOBAL_DIVISOR
    amax = None
    if per_block_scale is not None:
        if global_amax is None:
            raise ValueError("weights_scaling_factor needs weights_scaling_factor_2 too")
        amax = per_block_scale.float() * _E2M1.max_value * scale_2.float().reshape(())
    fmt = qk.QuantFormat.parse((2, 1), block_sizes={-1: block_size, "scale_bits": (4, 3)})
    if global_amax is None:
        global_amax = qk.nvfp4_global_amax(x=input)
    return qk.format_codes(input, fmt, amax, global_amax)


class NVFP4QTensor(BaseQuantizedTensor):
    """NVFP4 weights: ``_quantized_data`` holds E2M1 codes, two per uint8 (low nibble first)."""

    @classmethod
    def get_weights_scaling_factor_2(cls, input: torch.Tensor) -> torch.Tensor:
        """Per-tensor scale ``global_amax / (6 * 448)`` (float32, 0-d)."""
        return qk.nvfp4_global_amax(x=input) / _GLOBAL_DIVISOR

    @classmethod
    def get_weights_scaling_factor(
        cls,
        input: torch.Tensor,
        block_size: int,
        weights_scaling_factor_2: torch.Tensor | None = None,
        keep_high_precision: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block scales (``float8_e4m3fn``; float32 ``amax / (6 * scale_2)`` unrounded with
        ``keep_high_precision``) and the per-tensor scale."""
        if weights_scaling_factor_2 is None:
            weights_scaling_factor_2 = cls.get_weights_scaling_factor_2(input)
        if keep_high_precision:
            amax = qk.reduce_amax(input.detach(), block_sizes={-1: block_size}).float()
            scale = amax / (_E2M1.max_value * weights_scaling_factor_2.float())
            return torch.where(scale == 0, 1.0, scale), weights_scaling_factor_2
        qt = _codes(input, block_size, None, weights_scaling_factor_2)
        return qt.scale, weights_scaling_factor_2

    @classmethod
    def get_activation_scaling_factor(cls, quantizer: Any) -> torch.Tensor | None:
        """An enabled NVFP4 activation quantizer's exported scale ``amax / (6 * 448)``, else None."""
        if not quantizer.is_enabled:
            return None
        amax = quantizer.export_amax()
        return None if amax is None else amax.float() / _GLOBAL_DIVISOR

    @classmethod
    def quantize(
        cls,
        input: torch.Tensor,
        block_size: int,
        weights_scaling_factor: torch.Tensor | None = None,
        weights_scaling_factor_2: torch.Tensor | None = None,
        keep_high_precision: bool = False,
        try_tensorrt: bool = False,
    ) -> Any:
        """``(NVFP4QTensor, per-block scales, per-tensor scale)``; with ``keep_high_precision``,
        as ModelOpt, only ``input`` divided by its scales. ``try_tensorrt`` is accepted and
        ignored (no TensorRT-LLM kernel here)."""
        if weights_scaling_factor_2 is None:
            weights_scaling_factor_2 = cls.get_weights_scaling_factor_2(input)
        qt = _codes(input, block_size, weights_scaling_factor, weights_scaling_factor_2)
        if keep_high_precision:
            scale = qt.scale.float() * qt.global_scale
            blocks = input.float().reshape(*input.shape[:-1], -1, block_size)
            return (blocks / scale.unsqueeze(-1)).reshape(input.shape)
        packed = qt.packed_codes().view(torch.uint8)
        return cls(input.shape, input.dtype, packed), qt.scale, weights_scaling_factor_2

    def dequantize(
        self, dtype: torch.dtype | None = None, fast: bool = False, **kwarg: Any
    ) -> torch.Tensor:
        """Values ``e2m1(code) * scale * double_scale`` per block (``kwarg``: ``scale``,
        ``double_scale``, ``block_sizes``); ``fast`` is accepted and ignored."""
        missing = {"scale", "double_scale", "block_sizes"} - set(kwarg)
        if missing:
            raise ValueError(f"NVFP4QTensor.dequantize needs {sorted(missing)}")
        block_size = kwarg["block_sizes"][-1]
        codes = qk.unpack_fp4(self._quantized_data)
        values = _E2M1.values().float().to(codes.device)[codes.long()]
        scale = kwarg["scale"].float() * kwarg["double_scale"].float()
        blocks = values.reshape(*values.shape[:-1], -1, block_size) * scale.unsqueeze(-1)
        return blocks.reshape(self.metadata["shape"]).to(dtype or self.metadata["dtype"])
