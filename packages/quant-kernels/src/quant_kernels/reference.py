"""Pure-PyTorch reference numerics: grid rounding, block scales and fake quantization (the CPU path).

All arithmetic is float32 whatever the input dtype, in this order (the Triton kernels repeat it
operation for operation, so both paths agree bit for bit):

* ``scale`` per group: ``amax / M`` (float32 scales), ``e4m3(amax / M / g) * g`` with
  ``g = global_amax / (M * E4M3_MAX)`` (E4M3 scales, NVFP4), or ``2**ceil(log2(amax / M))`` (E8M0,
  MX, as ModelOpt), where ``M`` is the grid's largest magnitude (INT qmax, or the FP format's max).
  NVFP4 "four over six" (`four_over_six_scales`): ``g = global_amax / (6 * 256)`` and each block
  takes the scale of ``amax`` or of ``1.5 * amax`` (its max maps to 6 or to 4), whichever gives
  the smaller sum of squared errors on the block (6 on a tie).
* ``y = grid_round(clamp(x / scale, lo, hi)) * scale``: division as in ONNX QuantizeLinear,
  explicit saturation, round half to even on the element grid. A zero scale gives zeros; NaN stays NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from quant_kernels.blocking import group_amax
from quant_kernels.formats import E4M3_MAX, ElementFormat, ScaleMode
from quant_kernels.plan import QuantPlan, global_amax_of

__all__ = [
    "block_scales",
    "divide",
    "fake_quantize_reference",
    "four_over_six_scales",
    "global_scale",
    "grid_values",
    "round_to_grid_",
    "view_scales",
]

_EXPONENT_MASK = 0x7F800000
_E4M3 = ElementFormat.parse((4, 3))
_MAGIC = 12582912.0  # 1.5 * 2**23


def round_to_grid_(
    v: torch.Tensor, element: ElementFormat, work: torch.Tensor | None = None
) -> torch.Tensor:
    """Round float32 ``v`` (within the grid's range) in place to the element grid, half to even.

    ``(v + c) - c`` with ``c = 1.5 * 2**23 * step`` rounds v half to even to a multiple of step
    (zeros come out +0). INT grids have step 1; ``torch.round`` is avoided because its CPU kernel
    goes multi-threaded even on tiny tensors, which costs milliseconds per call on a busy machine.
    ``work`` (int32, v's shape) holds the FP step if given.
    """
    if element.is_int:
        return v.add_(_MAGIC).sub_(_MAGIC)
    # FP: step is the grid spacing in v's binade (subnormals share the smallest normal binade's):
    # p = 2**floor(log2|v|) from v's exponent bits, at least the smallest normal; c = p * k is a
    # power of two times 1.5, exact, so adding alpha * p (one rounding, FMA or not) adds c.
    p = torch.bitwise_and(v.view(torch.int32), _EXPONENT_MASK, out=work)
    p = p.view(torch.float32).clamp_(min=2.0**element.min_normal_exponent)
    k = _MAGIC * 2.0**-element.mantissa_bits
    return v.add_(p, alpha=k).sub_(p, alpha=k)


def divide(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` correctly rounded on every device.

    CUDA turns a division by a Python number into a multiplication by its float32 reciprocal,
    which is off by one ulp for some ``t``; a 0-d tensor divisor keeps the IEEE division.
    """
    return t / torch.full((), d, dtype=t.dtype, device=t.device)


def global_scale(global_amax: torch.Tensor, plan: QuantPlan) -> torch.Tensor:
    """NVFP4's float32 second-level scale ``global_amax / (M * E4M3_MAX)`` (``M * 256`` with four over six)."""
    return divide(global_amax.float(), plan.hi * plan.scale_norm)


def block_scales(
    amax: torch.Tensor, plan: QuantPlan, global_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-group float32 ``scale`` from float32 ``amax``, plus the stored scale codes.

    Returns ``(scale, stored, global_scale)``: ``stored`` is the E4M3 block scale (float32 values)
    for ``e4m3`` mode or the E8M0 shared exponent (int32, unbiased) for ``e8m0`` mode, else None;
    ``global_scale`` is NVFP4's float32 ``global_amax / (M * E4M3_MAX)``.
    """
    top = plan.hi
    if plan.scale_mode is ScaleMode.FLOAT32:
        return divide(amax, top), None, None
    if plan.scale_mode is ScaleMode.E4M3:
        gscale = global_scale(global_amax, plan)
        safe = torch.where(gscale == 0, 1.0, gscale)
        r = (divide(amax, top) / safe).clamp_(max=E4M3_MAX)
        stored = round_to_grid_(r, _E4M3)
        return stored * gscale, stored, gscale
    # E8M0 (as ModelOpt): scale = 2**ceil(log2(amax / M)), so amax never clips. INT grids carry an
    # implicit 2**-shift (MXINT8: 1.6 fixed point), so the stored exponent is the scale's + shift.
    # A NaN or Inf amax gives a NaN scale: the group becomes NaN.
    shift = plan.element.mx_shift
    unit = _ceil_log2(divide(amax, top)).clamp_(-127 - shift, 127 - shift)
    scale = torch.where(torch.isfinite(amax), _pow2(unit), float("nan"))
    return scale, unit + shift, None


def four_over_six_scales(
    xv: torch.Tensor, amax: torch.Tensor, plan: QuantPlan, global_amax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 "four over six" `block_scales` of the view ``xv``: per block, the scales of ``amax``
    (its max maps to 6) or ``1.5 * amax`` (to 4), whichever gives the smaller sum of squared errors
    of the block's fake-quantized values (6 on a tie), with ``g = global_amax / (6 * 256)``."""
    six = block_scales(amax, plan, global_amax)
    four = block_scales(amax * 1.5, plan, global_amax)
    reduce = plan.layout.reduce_dims
    x = xv.float()

    def error(scale: torch.Tensor) -> torch.Tensor:
        return (x - grid_values(x, scale, plan) * scale).square().sum(reduce, keepdim=True)

    pick_four = error(four[0]) < error(six[0])
    return (
        torch.where(pick_four, four[0], six[0]),
        torch.where(pick_four, four[1], six[1]),
        six[2],
    )


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
    ``scale`` float32 shaped ``plan.layout.scale_view_shape`` (used for the STE mask).

    On CPU each pass over x runs piece by piece (`_pieces`), so a piece's float32 temporaries stay
    in cache and each pass reads x from memory once: one pass for the dynamic amaxes, then the
    scales of all groups at once, then one pass that quantizes. Every value is computed by the same
    float32 operations as in one piece.
    """
    layout = plan.layout
    xv = layout.to_view(x.reshape(layout.shape))
    amax = plan.amax if plan.amax is not None else _amax_in_pieces(xv, layout.reduce_dims)
    scale, _, _ = view_scales(xv, amax, plan)
    clamp = not _clamp_is_noop(scale, plan)
    divisor = torch.where(scale == 0, 1.0, scale)
    out = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
    work = _Work(xv, plan)
    for idx in _pieces(xv.shape, _piece_size(xv), xv.dim()):
        group = _scale_index(idx, scale)
        _fake_quantize_piece(xv[idx], scale[group], divisor[group], plan, clamp, out[idx], work)
    y = layout.from_view(out).reshape(x.shape)
    return (y.contiguous() if layout.padded else y), scale


def view_scales(
    xv: torch.Tensor, amax: torch.Tensor, plan: QuantPlan
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`block_scales` of the groups of the view ``xv`` with group amaxes ``amax`` and the plan's
    global amax; with four over six, each block's choice (`four_over_six_scales`)."""
    global_amax = global_amax_of(plan, amax)
    if plan.four_over_six:
        return four_over_six_scales(xv, amax, plan, global_amax)
    return block_scales(amax, plan, global_amax)


def _amax_in_pieces(xv: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """`group_amax` of the view, piece by piece where whole groups fit in pieces (or per tensor);
    fp16/bf16 pieces are widened to float32 first (exact), whose reductions are far faster on CPU."""
    first_reduced = min(reduce_dims, default=xv.dim())
    limit = _piece_size(xv)
    if (first_reduced == 0 and len(reduce_dims) < xv.dim()) or limit >= xv.numel():
        return group_amax(xv, reduce_dims)  # groups along the first dim (per column), or one piece
    per_tensor = len(reduce_dims) == xv.dim()
    pieces = list(_pieces(xv.shape, limit, 1 if per_tensor else first_reduced))
    # rows of at most 16 (NVFP4 blocks): torch's amax/amin over such short rows are several times
    # slower than max_pool1d over |x| (which propagates NaN too)
    short = reduce_dims == (xv.dim() - 1,) and xv.shape[-1] <= 16
    wide = None
    if xv.dtype != torch.float32 or short:
        wide = torch.empty(max(xv[i].numel() for i in pieces), device=xv.device)

    def amax_of(idx: tuple[slice, ...], dims: tuple[int, ...]) -> torch.Tensor:
        xs = xv[idx]
        if wide is None:
            return group_amax(xs, dims)
        w = wide[: xs.numel()].view(xs.shape)
        if not short:
            return group_amax(w.copy_(xs), dims)
        w = torch.abs(xs, out=w) if xs.dtype == torch.float32 else w.copy_(xs).abs_()
        return F.max_pool1d(w.view(1, 1, -1), xs.shape[-1]).view(*xs.shape[:-1], 1)

    if per_tensor:  # the max of the pieces' maxima
        maxima = [amax_of(i, (0,)).reshape(1) for i in pieces]
        return torch.stack(maxima).amax().reshape((1,) * xv.dim())
    shape = tuple(1 if d in reduce_dims else n for d, n in enumerate(xv.shape))
    amax = torch.empty(shape, dtype=torch.float32, device=xv.device)
    for idx in pieces:
        amax[_scale_index(idx, amax)] = amax_of(idx, reduce_dims)
    return amax


def _piece_size(xv: torch.Tensor) -> int:
    """Elements per piece: `_PIECE` on CPU, the whole tensor elsewhere (one kernel per op)."""
    return _PIECE if xv.device.type == "cpu" else max(xv.numel(), 1)


def _scale_index(idx: tuple[slice, ...], scale: torch.Tensor) -> tuple[slice, ...]:
    """The part of a per-group tensor (keepdim shape) that a piece's index covers."""
    return tuple(i if n > 1 else slice(None) for i, n in zip(idx, scale.shape))


_PIECE = 1 << 17  # elements per piece on CPU: 512 KiB of float32, measured best on one thread


def _pieces(shape: tuple[int, ...], limit: int, depth: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples that cut a tensor of ``shape`` into pieces of about ``limit`` elements, slicing
    only its first ``depth`` dims (one whole piece when ``depth`` is 0)."""
    if depth == 0:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit or depth == 1:
        step = max(1, limit // max(inner, 1))
        for start in range(0, shape[0], step):
            yield (slice(start, start + step),)
        return
    for i in range(shape[0]):
        for rest in _pieces(shape[1:], limit, depth - 1):
            yield (slice(i, i + 1), *rest)


class _Work:
    """float32 buffers for one piece, reused by every piece of a call."""

    def __init__(self, xv: torch.Tensor, plan: QuantPlan):
        n = min(_piece_size(xv), xv.numel())
        self.q = torch.empty(n, dtype=torch.float32, device=xv.device)
        self.c = None if plan.element.is_int else torch.empty_like(self.q, dtype=torch.int32)

    def views(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The buffers shaped like a piece (the last piece may be shorter)."""
        n = math.prod(shape)
        c = None if self.c is None else self.c[:n].view(shape)
        return self.q[:n].view(shape), c


def _fake_quantize_piece(
    xs: torch.Tensor,
    scale: torch.Tensor,
    divisor: torch.Tensor,
    plan: QuantPlan,
    clamp: bool,
    out: torch.Tensor,
    work: _Work,
) -> None:
    """``out = grid_round(clamp(xs / divisor, lo, hi)) * scale`` in float32, stored in out's dtype
    (``divisor`` is the scale with zeros replaced by ones)."""
    q, c = work.views(xs.shape)
    torch.div(xs, divisor, out=q)  # float32 arithmetic: divisor is float32 with xs's rank
    if clamp:
        q.clamp_(plan.lo, plan.hi)
    round_to_grid_(q, plan.element, c)
    if out.dtype == torch.float32:
        torch.mul(q, scale, out=out)
    else:
        out.copy_(q.mul_(scale))


def grid_values(xv: torch.Tensor, scale: torch.Tensor, plan: QuantPlan) -> torch.Tensor:
    """``grid_round(clamp(xv / scale, lo, hi))`` in float32 (a new tensor): the element values
    before dequantization."""
    q = torch.div(xv.float(), torch.where(scale == 0, 1.0, scale))
    if not _clamp_is_noop(scale, plan):
        q.clamp_(plan.lo, plan.hi)
    return round_to_grid_(q, plan.element)


def _clamp_is_noop(scale: torch.Tensor, plan: QuantPlan) -> bool:
    """True when no value can leave the grid: dynamic groups on a symmetric grid whose scales came
    straight from their own amax (float32 scales that are normal numbers, or E8M0's rounded-up
    powers of two), so |x / scale| <= M * (1 + 2**-23) rounds to M at most. Saves a pass on CPU."""
    if not plan.dynamic or plan.lo > -plan.hi:
        return False
    if plan.scale_mode is ScaleMode.E8M0:
        return True
    if plan.scale_mode is not ScaleMode.FLOAT32 or scale.device.type != "cpu":
        return False  # the check below reads a value on the host: on a device it would wait for it
    tiny = (scale > 0) & (scale < 2.0**-126)  # subnormal scales are too coarse for the bound
    return not bool(tiny.any())
