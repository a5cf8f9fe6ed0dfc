"""Triton kernels for fake quantization (the GPU path); they repeat the reference arithmetic exactly.

Two kernels cover every plan whose groups are whole runs of rows/columns of ``x`` viewed as 2D
``(rows, last dim)``:

* `_rows_kernel`: groups that are contiguous runs along the last dim (block-wise, per token,
  per row). One pass: load a tile of groups, take each group's amax (dynamic) or load its scale
  (static), quantize, store. This is the hot path for INT4/INT8 blocks, FP8 per token, NVFP4, MX.
* `_tiles_kernel`: any other grouping (per tensor, per column, 2D blocks) over 2D tiles; each
  element looks its group's scale up. Dynamic amaxes for it are reduced by torch first.

Rounding uses float32 arithmetic only (the ``1.5 * 2**23`` trick; division with ``div_rn``; no FMA
contraction), so results match the reference on a GPU and under ``TRITON_INTERPRET=1``, whose
fp32->bf16 cast and ``libdevice.rint`` cannot be trusted.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quant_kernels.blocking import group_amax
from quant_kernels.plan import FP8_E4M3_MAX, QuantPlan
from quant_kernels.reference import block_scales, divide

__all__ = ["fake_quantize_triton", "supports"]

_MAX_ROW = 16384  # longest group the one-pass row kernel holds in registers
_SCALE_MODES = {"float32": 0, "e4m3": 1, "e8m0": 2}
_MAGIC = 12582912.0  # 1.5 * 2**23: (v + c) - c rounds v half to even to a multiple of c / _MAGIC


@triton.jit
def _round_grid(v, IS_INT: tl.constexpr, MIN_NORMAL: tl.constexpr, STEP: tl.constexpr):
    """Round float32 v (already clamped) half to even on an INT grid or an FP grid, as the
    reference: (v + c) - c with c = 1.5 * 2**23 * step (zeros come out +0)."""
    if IS_INT:
        r = (v + 12582912.0) - 12582912.0
    else:
        p = (v.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        c = tl.maximum(p, MIN_NORMAL) * (STEP * 12582912.0)
        r = (v + c) - c
    return r


@triton.jit
def _clamp(v, lo, hi):
    """Saturate to [lo, hi]; NaN passes through."""
    v = tl.where(v > hi, hi, v)
    return tl.where(v < lo, lo, v)


@triton.jit
def _to_output(y, OUT_BF16: tl.constexpr, out_dtype: tl.constexpr):
    """Cast float32 to the output dtype; bf16 is rounded half to even by hand."""
    if OUT_BF16:
        u = y.to(tl.int32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & -65536  # keep the top 16 bits, rounded half to even
        y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))  # NaN payloads may carry over
    return y.to(out_dtype)


@triton.jit
def _scale_from_amax(amax, gscale, top, SCALE_MODE: tl.constexpr, MX_SHIFT: tl.constexpr):
    """Per-group scale, as `reference.block_scales`: amax/M, E4M3 two-level, or E8M0 2**ceil(log2(amax/M))."""
    if SCALE_MODE == 0:
        scale = tl.math.div_rn(amax, top)
    elif SCALE_MODE == 1:
        safe = tl.where(gscale == 0, 1.0, gscale)
        r = tl.math.div_rn(tl.math.div_rn(amax, top), safe)
        r = tl.where(r > 448.0, 448.0, r)
        stored = _round_grid(r, False, 0.015625, 0.125)  # E4M3: min normal 2**-6, 3 mantissa bits
        scale = stored * gscale
    else:
        bits = tl.math.div_rn(amax, top).to(tl.int32, bitcast=True)
        biased = (bits >> 23) & 0xFF
        unit = tl.where(biased == 0, -127, biased - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32))
        unit = tl.minimum(tl.maximum(unit, -127 - MX_SHIFT), 127 - MX_SHIFT)
        # 2**unit from its bits; subnormal powers (unit < -126) via 2**(unit + 64) * 2**-64, exact
        normal = ((tl.maximum(unit, -126) + 127) << 23).to(tl.float32, bitcast=True)
        tiny = ((tl.minimum(unit, -64) + 191) << 23).to(
            tl.float32, bitcast=True
        ) * 5.421010862427522e-20
        scale = tl.where(unit >= -126, normal, tiny)
        scale = tl.where((amax != amax) | (amax == float("inf")), float("nan"), scale)
    return scale


@triton.jit
def _rows_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    gscale_ptr,
    n_groups,
    width,
    lo,
    hi,
    top,
    DYNAMIC: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    MX_SHIFT: tl.constexpr,
    IS_INT: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    STEP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_W)
    row_ok = rows < n_groups
    mask = row_ok[:, None] & (cols < width)[None, :]
    offs = rows[:, None].to(tl.int64) * width + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DYNAMIC:
        amax = tl.max(tl.abs(x), axis=1)
        has_nan = tl.max((x != x).to(tl.int32), axis=1)
        amax = tl.where(has_nan > 0, float("nan"), amax)
        gscale = 0.0
        if SCALE_MODE == 1:
            gscale = tl.load(gscale_ptr)
        scale = _scale_from_amax(amax, gscale, top, SCALE_MODE, MX_SHIFT)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
    else:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    divisor = tl.where(scale == 0, 1.0, scale)
    v = _clamp(tl.math.div_rn(x, divisor[:, None]), lo, hi)
    y = _round_grid(v, IS_INT, MIN_NORMAL, STEP) * scale[:, None]
    tl.store(y_ptr + offs, _to_output(y, OUT_BF16, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tiles_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    group_h,
    group_w,
    n_group_cols,
    lo,
    hi,
    IS_INT: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    STEP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    # one scale per (group_h x group_w) rectangle; the divisions run per row and per column only
    scale_idx = (rows // group_h)[:, None] * n_group_cols + (cols // group_w)[None, :]
    scale = tl.load(scale_ptr + scale_idx, mask=mask, other=1.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    divisor = tl.where(scale == 0, 1.0, scale)
    v = _clamp(tl.math.div_rn(x, divisor), lo, hi)
    y = _round_grid(v, IS_INT, MIN_NORMAL, STEP) * scale
    tl.store(y_ptr + offs, _to_output(y, OUT_BF16, y_ptr.dtype.element_ty), mask=mask)


def _groups_2d(shape: tuple[int, ...], group: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """``(rows, cols, group_rows, group_cols)`` of the 2D view when every group is a rectangle of it."""
    n_cols, group_w = shape[-1], group[-1]
    if n_cols % group_w:
        return None
    lead, lead_group = shape[:-1], group[:-1]
    group_h, i = 1, len(lead) - 1
    while i >= 0 and lead_group[i] == lead[i]:  # trailing leading dims wholly inside a group
        group_h *= lead[i]
        i -= 1
    if i >= 0:  # at most one blocked leading dim, then one group per index
        if lead[i] % lead_group[i]:
            return None
        group_h *= lead_group[i]
        i -= 1
    if any(g != 1 for g in lead_group[: i + 1]):
        return None
    return math.prod(lead), n_cols, group_h, group_w


def supports(x: torch.Tensor, plan: QuantPlan) -> bool:
    """True when the kernels handle ``plan`` for ``x`` (groups are rectangles of the 2D view, no padding)."""
    layout = plan.layout
    return (
        not layout.padded
        and x.numel() < 2**31
        and _groups_2d(layout.shape, layout.group) is not None
    )


def _element_args(plan: QuantPlan, out: torch.Tensor) -> dict:
    e = plan.element
    return {
        "IS_INT": e.is_int,
        "MIN_NORMAL": 1.0 if e.is_int else 2.0**e.min_normal_exponent,
        "STEP": 1.0 if e.is_int else 2.0**-e.mantissa_bits,
        "OUT_BF16": out.dtype == torch.bfloat16,
    }


def fake_quantize_triton(x: torch.Tensor, plan: QuantPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.fake_quantize_reference` (same result, same ``(y, scale)`` return)."""
    layout = plan.layout
    dims = _groups_2d(layout.shape, layout.group)
    if dims is None or layout.padded:
        raise ValueError(
            f"the Triton kernels do not handle groups {layout.group} of shape {layout.shape}"
        )
    n_rows, n_cols, group_h, group_w = dims
    xc = x.contiguous()
    y = torch.empty_like(xc)
    elem = _element_args(plan, y)
    lo, hi, top = plan.lo, plan.hi, plan.hi
    mode = _SCALE_MODES[plan.scale_mode]

    if group_h == 1 and group_w <= _MAX_ROW:
        n_groups = xc.numel() // group_w
        block_w = triton.next_power_of_2(group_w)
        rows = max(1, min(256, 4096 // block_w))  # about 4096 elements per program
        grid = (triton.cdiv(n_groups, rows),)
        gscale = torch.zeros((), dtype=torch.float32, device=x.device)
        if plan.dynamic:
            scale = torch.empty(n_groups, dtype=torch.float32, device=x.device)
            if plan.scale_mode == "e4m3":
                gamax = plan.global_amax if plan.global_amax is not None else _abs_max(xc)
                gscale = divide(gamax.float(), top * FP8_E4M3_MAX).reshape(())
        else:
            scale = block_scales(plan.amax, plan, plan.global_amax)[0].reshape(-1).contiguous()
        _rows_kernel[grid](
            xc,
            y,
            scale,
            gscale,
            n_groups,
            group_w,
            lo,
            hi,
            top,
            DYNAMIC=plan.dynamic,
            SCALE_MODE=mode,
            MX_SHIFT=plan.element.mx_shift,
            ROWS=rows,
            BLOCK_W=block_w,
            num_warps=4 if rows * block_w <= 4096 else 8,
            enable_fp_fusion=False,
            **elem,
        )
        return y.reshape(x.shape), scale.reshape(layout.scale_view_shape)

    amax = plan.amax
    gamax = plan.global_amax
    if amax is None:
        amax = group_amax(layout.to_view(xc.reshape(layout.shape)), layout.reduce_dims)
        if plan.scale_mode == "e4m3" and gamax is None:
            gamax = amax.amax()
    scale = block_scales(amax, plan, gamax)[0].contiguous()
    bm, bn = 16, 256
    _tiles_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
        xc,
        y,
        scale,
        n_rows,
        n_cols,
        group_h,
        group_w,
        n_cols // group_w,
        lo,
        hi,
        BM=bm,
        BN=bn,
        num_warps=4,
        enable_fp_fusion=False,
        **elem,
    )
    return y.reshape(x.shape), scale.reshape(layout.scale_view_shape)


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor (float32, 0-d); NaN if any NaN."""
    return group_amax(x.reshape(-1), (0,)).reshape(())
