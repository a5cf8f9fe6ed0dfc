"""Triton kernels for fake quantization (the GPU path); they repeat the reference arithmetic exactly.

Two kernels cover every plan whose groups are whole runs of rows/columns of ``x`` viewed as 2D
``(rows, last dim)``. Both take float32 amaxes, one per group, and turn them into scales in-kernel
(`_scale_from_amax`; NVFP4's global scale comes in as a 0-d tensor from `reference.global_scale`),
storing the scales they use for the caller, so no torch pass runs over the scales first:

* `_rows_kernel`: groups that are contiguous runs along the last dim (block-wise, per token,
  per row). One pass: load a tile of whole groups, take each group's amax (dynamic) or load it
  (static), compute and store the scales, quantize, store. This is the hot path for INT4/INT8
  blocks, FP8 per token, NVFP4, MX.
* `_tiles_kernel`: any other grouping (per tensor, per column, 2D blocks) over 2D tiles (16 x 256
  on wide tensors). Dynamic amaxes for it (and NVFP4's dynamic global amax) come from a two-stage
  reduction first: `_tile_amax_kernel` takes max |x| per tile, torch the max over each group's
  tiles (an array 4096 times smaller than x). The constexpr flags
  ``ROWS_VARY`` / ``COLS_VARY`` say whether a tile spans several groups down / across, so a tile
  loads one amax (per tensor, or blocks holding whole tiles), a ``[1, BN]`` row of them (per
  column), a ``[BM, 1]`` column (per row) or, for 2D blocks crossing the tile, one per element.

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
from quant_kernels.formats import E4M3_MAX, ScaleMode
from quant_kernels.plan import QuantPlan, global_amax_of
from quant_kernels.reference import global_scale

__all__ = ["fake_quantize_triton", "supports"]

_MAX_ROW = 16384  # longest group the one-pass row kernel holds in registers
# Elements per program: measured on an H200 (8192 x 8192 bf16), 2048 for the row kernel (whole
# groups, at most 256) and 16 x 256 tiles with 4 warps beat larger programs.
_ROW_ELEMS = 2048
_TILE_W, _TILE_ELEMS, _TILE_WARPS = 256, 4096, 4  # widest tile, elements per tile, warps
_SCALE_MODES = {ScaleMode.FLOAT32: 0, ScaleMode.E4M3: 1, ScaleMode.E8M0: 2}
_E4M3_MAX = tl.constexpr(E4M3_MAX)
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
def _scale_from_amax(amax, gscale_ptr, top, SCALE_MODE: tl.constexpr, MX_SHIFT: tl.constexpr):
    """Per-group scale, as `reference.block_scales`: amax/M, E4M3 two-level (global scale read from
    ``gscale_ptr``), or E8M0 2**ceil(log2(amax/M))."""
    if SCALE_MODE == 0:
        scale = tl.math.div_rn(amax, top)
    elif SCALE_MODE == 1:
        gscale = tl.load(gscale_ptr)
        safe = tl.where(gscale == 0, 1.0, gscale)
        r = tl.math.div_rn(tl.math.div_rn(amax, top), safe)
        r = tl.where(r > _E4M3_MAX, _E4M3_MAX, r)
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
def _fake_quant(
    x, scale, lo, hi, IS_INT: tl.constexpr, MIN_NORMAL: tl.constexpr, STEP: tl.constexpr
):
    """``grid_round(clamp(x / scale, lo, hi)) * scale`` in float32 (a zero scale divides by 1);
    ``scale`` broadcasts against ``x`` (a scalar, a row or column vector, or a full tile)."""
    divisor = tl.where(scale == 0, 1.0, scale)
    v = _clamp(tl.math.div_rn(x, divisor), lo, hi)
    return _round_grid(v, IS_INT, MIN_NORMAL, STEP) * scale


@triton.jit
def _rows_kernel(
    x_ptr,
    y_ptr,
    amax_ptr,
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
    else:
        amax = tl.load(amax_ptr + rows, mask=row_ok, other=0.0)
    scale = _scale_from_amax(amax, gscale_ptr, top, SCALE_MODE, MX_SHIFT)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    y = _fake_quant(x, scale[:, None], lo, hi, IS_INT, MIN_NORMAL, STEP)
    tl.store(y_ptr + offs, _to_output(y, OUT_BF16, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tiles_kernel(
    x_ptr,
    y_ptr,
    amax_ptr,
    scale_ptr,
    gscale_ptr,
    n_rows,
    n_cols,
    group_h,
    group_w,
    n_group_cols,
    lo,
    hi,
    top,
    SCALE_MODE: tl.constexpr,
    MX_SHIFT: tl.constexpr,
    IS_INT: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    STEP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ROWS_VARY: tl.constexpr,
    COLS_VARY: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    r0 = tl.program_id(0) * BM
    c0 = tl.program_id(1) * BN
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Group coordinates of the tile's elements, [1, 1] along an axis where the whole tile lies in one
    # group (ROWS_VARY / COLS_VARY False): the scale is then one value, a [BM, 1] column, a [1, BN]
    # row, or (2D blocks crossing the tile) a full [BM, BN] gather. [1, 1], not a scalar: the
    # interpreter mistypes a scalar & tensor mask.
    one = tl.zeros((1, 1), tl.int32)
    r = rows[:, None] if ROWS_VARY else r0 + one
    c = cols[None, :] if COLS_VARY else c0 + one
    inside = (r < n_rows) & (c < n_cols)
    idx = (r // group_h) * n_group_cols + c // group_w
    amax = tl.load(amax_ptr + idx, mask=inside, other=0.0)
    scale = _scale_from_amax(amax, gscale_ptr, top, SCALE_MODE, MX_SHIFT)
    # each group's scale is stored where its first element is
    tl.store(scale_ptr + idx, scale, mask=inside & (r % group_h == 0) & (c % group_w == 0))
    y = _fake_quant(x, scale, lo, hi, IS_INT, MIN_NORMAL, STEP)
    tl.store(y_ptr + offs, _to_output(y, OUT_BF16, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_amax_kernel(
    x_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    group_h,
    group_w,
    TILES_H: tl.constexpr,
    TILES_W: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Stage 1 of the dynamic amax: max |x| (NaN if it holds a NaN) of one BM x BN tile of a group
    (each group is TILES_H x TILES_W tiles, the last ones cut at the group's edge), stored at
    ``partial[program row, program column]``; torch then reduces each group's tiles."""
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    r_end = tl.minimum((pr // TILES_H + 1) * group_h, n_rows)
    c_end = tl.minimum((pc // TILES_W + 1) * group_w, n_cols)
    rows = (pr // TILES_H) * group_h + (pr % TILES_H) * BM + tl.arange(0, BM)
    cols = (pc // TILES_W) * group_w + (pc % TILES_W) * BN + tl.arange(0, BN)
    mask = (rows < r_end)[:, None] & (cols < c_end)[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    has_nan = tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0)
    amax = tl.where(has_nan > 0, float("nan"), amax)
    tl.store(partial_ptr + pr * tl.num_programs(1) + pc, amax)


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
        and not plan.four_over_six
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
    scale = torch.empty(layout.num_groups, dtype=torch.float32, device=x.device)
    args = {
        "SCALE_MODE": _SCALE_MODES[plan.scale_mode],
        "MX_SHIFT": plan.element.mx_shift,
        "enable_fp_fusion": False,
        **_element_args(plan, y),
    }
    lo, hi, top = plan.lo, plan.hi, plan.hi

    if group_h == 1 and group_w <= _MAX_ROW:
        amax = scale if plan.dynamic else plan.amax.reshape(-1).contiguous()  # dynamic: unused
        block_w = triton.next_power_of_2(group_w)
        rows = max(1, min(256, _ROW_ELEMS // block_w))
        _rows_kernel[(triton.cdiv(layout.num_groups, rows),)](
            xc,
            y,
            amax,
            scale,
            _global_scale(plan, xc, None, scale),
            layout.num_groups,
            group_w,
            lo,
            hi,
            top,
            DYNAMIC=plan.dynamic,
            ROWS=rows,
            BLOCK_W=block_w,
            num_warps=4 if rows * block_w <= 4096 else 8,
            **args,
        )
        return y.reshape(x.shape), scale.reshape(layout.scale_view_shape)

    amax = plan.amax
    if amax is None and group_w < 16:  # narrow groups (per column): torch reads them better
        amax = group_amax(layout.to_view(xc.reshape(layout.shape)), layout.reduce_dims)
    elif amax is None:  # dynamic: the amaxes first, by a two-stage reduction
        amax = _group_amax_2d(xc, n_rows, n_cols, group_h, group_w)
    amax = amax.contiguous()
    bn = min(_TILE_W, triton.next_power_of_2(n_cols))
    bm = min(1024, _TILE_ELEMS // bn)
    _tiles_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
        xc,
        y,
        amax,
        scale,
        _global_scale(plan, xc, amax, scale),
        n_rows,
        n_cols,
        group_h,
        group_w,
        n_cols // group_w,
        lo,
        hi,
        top,
        ROWS_VARY=group_h % bm != 0 and group_h < n_rows,
        COLS_VARY=group_w % bn != 0 and group_w < n_cols,
        BM=bm,
        BN=bn,
        num_warps=_TILE_WARPS,
        **args,
    )
    return y.reshape(x.shape), scale.reshape(layout.scale_view_shape)


def _global_scale(
    plan: QuantPlan, xc: torch.Tensor, amax: torch.Tensor | None, unused: torch.Tensor
) -> torch.Tensor:
    """NVFP4's float32 global scale ``global_amax / (M * E4M3_MAX)`` (0-d) for e4m3 plans, else ``unused``
    (any float32 tensor: the kernels do not read it). A dynamic plan's global amax is max |x|."""
    if plan.scale_mode is not ScaleMode.E4M3:
        return unused
    if amax is None and plan.global_amax is None:
        amax = _abs_max(xc)
    return global_scale(global_amax_of(plan, amax), plan).reshape(())


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor (float32, 0-d); NaN if any NaN."""
    n_cols = x.shape[-1] if x.dim() else 1
    n_rows = x.numel() // n_cols
    return _group_amax_2d(x, n_rows, n_cols, n_rows, n_cols).reshape(())


def _group_amax_2d(
    x: torch.Tensor, n_rows: int, n_cols: int, group_h: int, group_w: int
) -> torch.Tensor:
    """max |x| per ``group_h x group_w`` rectangle of contiguous ``x`` viewed as ``(n_rows, n_cols)``,
    as float32 ``(groups down, groups across)`` (NaN where a group holds a NaN).

    Stage 1 (`_tile_amax_kernel`) reduces tiles of up to 4096 elements that each lie in one group;
    stage 2 reduces each group's tiles in torch, over an array about 4096 times smaller than x.
    """
    bn = min(_TILE_W, triton.next_power_of_2(group_w))
    bm = min(max(1, _TILE_ELEMS // bn), triton.next_power_of_2(group_h))
    groups_r, groups_c = n_rows // group_h, n_cols // group_w
    tiles_h, tiles_w = triton.cdiv(group_h, bm), triton.cdiv(group_w, bn)
    partial = torch.empty(groups_r * tiles_h, groups_c * tiles_w, device=x.device)
    _tile_amax_kernel[(groups_r * tiles_h, groups_c * tiles_w)](
        x,
        partial,
        n_rows,
        n_cols,
        group_h,
        group_w,
        TILES_H=tiles_h,
        TILES_W=tiles_w,
        BM=bm,
        BN=bn,
        num_warps=_TILE_WARPS,
    )
    return partial.view(groups_r, tiles_h, groups_c, tiles_w).amax(dim=(1, 3))
