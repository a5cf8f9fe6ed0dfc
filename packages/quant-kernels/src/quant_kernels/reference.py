"""Pure-PyTorch reference numerics: grid rounding, block scales and fake quantization (the CPU path).

All arithmetic is float32 whatever the input dtype, in this order (the Triton kernels repeat it
operation for operation, so both paths agree bit for bit):

* ``scale`` per group: ``amax / M`` (float32 scales), ``e4m3(amax / M / g) * g`` with
  ``g = global_amax / (M * 448)`` (E4M3 scales, NVFP4), or ``2**ceil(log2(amax / M))`` (E8M0,
  MX, as ModelOpt), where ``M`` is the grid's largest magnitude (INT qmax, or the FP format's max).
* ``y = grid_round(clamp(x / scale, lo, hi)) * scale``: division as in ONNX QuantizeLinear,
  explicit saturation, round half to even on the element grid. A zero scale gives zeros; NaN stays NaN.
"""

from __future__ import annotations

import torch

from quant_kernels.blocking import group_amax
from quant_kernels.formats import ElementFormat
from quant_kernels.plan import FP8_E4M3_MAX, QuantPlan

__all__ = [
    "block_scales",
    "divide",
    "fake_quantize_reference",
    "global_scale",
    "grid_values",
    "round_to_grid_",
]

_EXPONENT_MASK = 0x7F800000
_E4M3 = ElementFormat.parse((4, 3))
_MAGIC = 12582912.0  # 1.5 * 2**23


def round_to_grid_(v: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """Round float32 ``v`` (within the grid's range) in place to the element grid, half to even.

    ``(v + c) - c`` with ``c = 1.5 * 2**23 * step`` rounds v half to even to a multiple of step
    (zeros come out +0). INT grids have step 1; ``torch.round`` is avoided because its CPU kernel
    goes multi-threaded even on tiny tensors, which costs milliseconds per call on a busy machine.
    """
    if element.is_int:
        return v.add_(_MAGIC).sub_(_MAGIC)
    # FP: step is the grid spacing in v's binade (subnormals share the smallest normal binade's).
    c = torch.bitwise_and(v.view(torch.int32), _EXPONENT_MASK).view(torch.float32)
    c.clamp_(min=2.0**element.min_normal_exponent).mul_(_MAGIC * 2.0**-element.mantissa_bits)
    return v.add_(c).sub_(c)


def divide(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` correctly rounded on every device.

    CUDA turns a division by a Python number into a multiplication by its float32 reciprocal,
    which is off by one ulp for some ``t``; a 0-d tensor divisor keeps the IEEE division.
    """
    return t / torch.full((), d, dtype=t.dtype, device=t.device)


def global_scale(global_amax: torch.Tensor, plan: QuantPlan) -> torch.Tensor:
    """NVFP4's float32 second-level scale ``global_amax / (M * 448)``."""
    return divide(global_amax.float(), plan.hi * FP8_E4M3_MAX)


def block_scales(
    amax: torch.Tensor, plan: QuantPlan, global_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-group float32 ``scale`` from float32 ``amax``, plus the stored scale codes.

    Returns ``(scale, stored, global_scale)``: ``stored`` is the E4M3 block scale (float32 values)
    for ``e4m3`` mode or the E8M0 shared exponent (int32, unbiased) for ``e8m0`` mode, else None;
    ``global_scale`` is NVFP4's float32 ``global_amax / (M * 448)``.
    """
    top = plan.hi
    if plan.scale_mode == "float32":
        return divide(amax, top), None, None
    if plan.scale_mode == "e4m3":
        gscale = global_scale(global_amax, plan)
        safe = torch.where(gscale == 0, 1.0, gscale)
        r = (divide(amax, top) / safe).clamp_(max=FP8_E4M3_MAX)
        stored = round_to_grid_(r, _E4M3)
        return stored * gscale, stored, gscale
    # E8M0 (as ModelOpt): scale = 2**ceil(log2(amax / M)), so amax never clips. INT grids carry an
    # implicit 2**-shift (MXINT8: 1.6 fixed point), so the stored exponent is the scale's + shift.
    # A NaN or Inf amax gives a NaN scale: the group becomes NaN.
    shift = plan.element.mx_shift
    unit = _ceil_log2(divide(amax, top)).clamp_(-127 - shift, 127 - shift)
    scale = torch.where(torch.isfinite(amax), _pow2(unit), float("nan"))
    return scale, unit + shift, None


def _pow2(unit: torch.Tensor) -> torch.Tensor:
    """``2**unit`` (int32, -149..127) as float32 from its bits: CUDA's exp2 is one ulp off for
    some subnormal results (2**-127 among them); subnormals as ``2**(unit + 64) * 2**-64``."""
    normal = ((unit.clamp(min=-126) + 127) << 23).view(torch.float32)
    tiny = ((unit.clamp(max=-64) + 191) << 23).view(torch.float32) * 2.0**-64
    return torch.where(unit >= -126, normal, tiny)


def _ceil_log2(r: torch.Tensor) -> torch.Tensor:
    """ceil(log2(r)) for float32 r >= 0 from its bits (int32); zero/subnormal give -127, inf/NaN 128."""
    bits = r.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    exact = (bits & 0x7FFFFF) == 0
    return torch.where(biased == 0, -127, biased - 127 + (~exact).int())


def fake_quantize_reference(x: torch.Tensor, plan: QuantPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` per ``plan``; returns ``(y, scale)`` with y in x's dtype and shape and
    ``scale`` float32 shaped ``plan.layout.scale_view_shape`` (used for the STE mask)."""
    layout = plan.layout
    xv = layout.to_view(x.reshape(layout.shape))
    amax = plan.amax if plan.amax is not None else group_amax(xv, layout.reduce_dims)
    gamax = plan.global_amax
    if plan.scale_mode == "e4m3" and gamax is None:
        gamax = amax.amax()  # dynamic NVFP4: max |x| of the whole tensor
    scale, _, _ = block_scales(amax, plan, gamax)
    # Work in float32 in place: converting first and last is cheaper than mixed-dtype arithmetic.
    owned = xv.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    q = grid_values(xv, scale, plan, inplace=owned)
    y = layout.from_view(q.mul_(scale)).reshape(x.shape)
    if layout.padded:
        y = y.contiguous()
    return y.to(x.dtype), scale


def grid_values(
    xv: torch.Tensor, scale: torch.Tensor, plan: QuantPlan, inplace: bool = False
) -> torch.Tensor:
    """``grid_round(clamp(xv / scale, lo, hi))`` in float32: the element values before dequantization.

    A new tensor, unless ``inplace`` and ``xv`` is already float32 (then ``xv`` is overwritten).
    """
    divisor = torch.where(scale == 0, 1.0, scale)
    if xv.dtype != torch.float32:
        q = xv.float().div_(divisor)
    elif inplace:
        q = xv.div_(divisor)
    else:
        q = torch.div(xv, divisor)
    if not _clamp_is_noop(scale, plan):
        q.clamp_(plan.lo, plan.hi)
    return round_to_grid_(q, plan.element)


def _clamp_is_noop(scale: torch.Tensor, plan: QuantPlan) -> bool:
    """True when no value can leave the grid: dynamic groups on a symmetric grid whose scales came
    straight from their own amax (float32 scales that are normal numbers, or E8M0's rounded-up
    powers of two), so |x / scale| <= M * (1 + 2**-23) rounds to M at most. Saves a pass on CPU."""
    if not plan.dynamic or plan.lo > -plan.hi:
        return False
    if plan.scale_mode == "e8m0":
        return True
    if plan.scale_mode != "float32" or scale.device.type != "cpu":
        return False  # the check below reads a value on the host: on a device it would wait for it
    tiny = (scale > 0) & (scale < 2.0**-126)  # subnormal scales are too coarse for the bound
    return not bool(tiny.any())
