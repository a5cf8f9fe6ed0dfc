"""Real quantization for export: integer/float codes plus their scales, and the exact inverse.

``dequantize_codes(quantize_to_codes(x, ...))`` equals ``fake_quantize(x, ...)`` bit for bit, so an
exported checkpoint reproduces what calibration and QAT simulated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from quant_kernels.blocking import group_amax
from quant_kernels.formats import ElementFormat, QuantFormat, ScaleMode
from quant_kernels.packing import e8m0_to_float, exponent_to_e8m0, pack_fp4, pack_int4
from quant_kernels.plan import QuantPlan, make_plan, plan_for_format
from quant_kernels.reference import grid_values, view_scales

__all__ = ["QuantizedTensor", "dequantize_codes", "format_codes", "quantize_to_codes"]


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and scales of one quantized tensor.

    ``codes`` has x's shape: int8 / uint8 (INT up to 8 bits; int16 / int32 wider), ``float8_e4m3fn`` /
    ``float8_e5m2`` (FP8), or uint8 bit codes one per byte (FP6, FP4; see `packed_codes`).
    ``scale`` has one value per group, shaped as `reduce_amax` returns: float32 dequantization
    scales, ``float8_e4m3fn`` block scales (E4M3 mode; multiply by ``global_scale``), or
    ``float8_e8m0fnu`` shared exponents (MX; MXINT8 codes carry an implicit 2**-6).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    plan: QuantPlan
    dtype: torch.dtype

    @property
    def element(self) -> ElementFormat:
        """The element format of ``codes``."""
        return self.plan.element

    def packed_codes(self) -> torch.Tensor:
        """INT4 codes two per byte (uint8) or E2M1 codes as ``float4_e2m1fn_x2``; other formats unchanged."""
        if self.element.packed_nibbles:  # INT4 / UINT4, or FP4 E2M1 (the one 4-bit FP element)
            return pack_int4(self.codes) if self.element.is_int else pack_fp4(self.codes)
        return self.codes

    def dequantize(self) -> torch.Tensor:
        """The dequantized tensor (x's dtype): equals `fake_quantize` with the same arguments."""
        return dequantize_codes(self)


def _fp_to_bits(q: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """Bit codes (uint8) of float32 values that lie on an FP element grid."""
    if element.torch_dtype in ("float8_e4m3fn", "float8_e5m2"):
        return q.to(getattr(torch, element.torch_dtype))
    table = element.values().float()
    half = 2 ** (element.bits - 1)
    positive = table[:half]  # codes 0..half-1 hold +0 and the positive values, increasing
    idx = torch.searchsorted(positive, q.abs().contiguous())
    sign = torch.signbit(q).to(torch.int64) * half
    return (idx + sign).to(torch.uint8)


def _bits_to_values(codes: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """float32 values of element codes."""
    if element.is_int or codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return codes.float()
    return element.values().float().to(codes.device)[codes.long()]


def format_codes(
    x: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor | float | None = None,
    global_amax: torch.Tensor | float | None = None,
    block_sizes: dict[int, int | None] | None = None,
) -> QuantizedTensor:
    """Codes and scales of ``x`` in the typed format ``fmt``: the one path from a quantizer's state
    to stored codes (compress, ``QTensor`` and every exporter call it).

    ``amax`` is the calibrated amax (ignored by dynamic formats), ``global_amax`` NVFP4's per-tensor
    amax, ``block_sizes`` the blocks with axes made non-negative for ``x`` (default: the format's).
    """
    if block_sizes is not None:
        fmt = dataclasses.replace(fmt, blocks=tuple(block_sizes.items()))
    return plan_codes(x, plan_for_format(x, fmt, None if fmt.dynamic else amax, global_amax))


def quantize_to_codes(
    x: torch.Tensor,
    num_bits: int | tuple[int, int] = 8,
    amax: torch.Tensor | float | None = None,
    block_sizes: dict | None = None,
    scale_bits: tuple[int, int] | None = None,
    global_amax: torch.Tensor | float | None = None,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` to codes and per-group scales (same arguments and semantics as `fake_quantize`).

    NaN inputs have no code: FP8 keeps NaN, other formats raise ValueError. FP codes of negative
    values that round to zero are -0 (``fake_quantize`` itself returns +0 there).
    """
    plan = make_plan(
        x, num_bits, amax, block_sizes, scale_bits, global_amax, unsigned, narrow_range
    )
    return plan_codes(x, plan)


def plan_codes(x: torch.Tensor, plan: QuantPlan) -> QuantizedTensor:
    """Codes and scales of ``x`` quantized by ``plan`` (see `quantize_to_codes`)."""
    layout = plan.layout
    xv = layout.to_view(x.detach().reshape(layout.shape))
    amax_v = plan.amax if plan.amax is not None else group_amax(xv, layout.reduce_dims)
    scale, stored, gscale = view_scales(xv, amax_v, plan)
    q = grid_values(xv, scale, plan)
    if (
        not plan.element.is_int
    ):  # a negative value that rounds to zero is coded -0, as ModelOpt packs it
        q = torch.where((q == 0) & torch.signbit(xv), -0.0, q)
    q = layout.from_view(q)
    element = plan.element
    fp8 = element.torch_dtype in ("float8_e4m3fn", "float8_e5m2")
    if not fp8 and bool(torch.isnan(q).any()):
        raise ValueError(f"x has NaN values, which have no {element.name} code")
    codes = q.to(getattr(torch, element.torch_dtype)) if element.is_int else _fp_to_bits(q, element)
    codes = codes.reshape(x.shape)
    shape = layout.scale_shape
    if plan.scale_mode is ScaleMode.E4M3:
        out_scale = stored.reshape(shape).to(torch.float8_e4m3fn)
    elif plan.scale_mode is ScaleMode.E8M0:
        e8m0 = exponent_to_e8m0(stored).view(torch.uint8)
        e8m0 = torch.where(torch.isnan(amax_v), 255, e8m0).to(torch.uint8)  # E8M0 NaN
        out_scale = e8m0.reshape(shape).view(torch.float8_e8m0fnu)
    else:
        out_scale = scale.reshape(shape)
    return QuantizedTensor(codes, out_scale, gscale, plan, x.dtype)


def dequantize_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Values of ``qt`` in its original dtype: ``element_value(code) * scale`` per group."""
    plan = qt.plan
    layout = plan.layout
    mode = plan.scale_mode
    if mode is ScaleMode.E4M3:
        scale = qt.scale.float() * qt.global_scale
    elif mode is ScaleMode.E8M0:
        scale = e8m0_to_float(qt.scale)
        if plan.element.is_int:
            scale = scale * 2.0**-plan.element.mx_shift
    else:
        scale = qt.scale
    values = _bits_to_values(qt.codes, plan.element).reshape(layout.shape)
    y = layout.to_view(values).mul_(scale.reshape(layout.scale_view_shape))
    return layout.from_view(y).reshape(qt.codes.shape).to(qt.dtype)
