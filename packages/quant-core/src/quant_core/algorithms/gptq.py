"""GPTQ: Hessian-based, error-compensating weight rounding (Frantar et al., 2022).

Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian's Cholesky factor, with lazy block updates. Many
layers with the same input width run as one batch (one Python loop over columns for all).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quant_kernels as qk
from quant_core.algorithms._blocks import num_blocks
from quant_core.algorithms.dead_channels import fill_dead_channels
from quant_core.algorithms.output_error import mse_amax, output_error
from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.statistics import (
    calibrate_with_stats,
    effective_input_stats,
    max_calibrate,
)
from quant_core.algorithms.weights import (
    BlockFormat,
    apply_input_scale,
    first_stage,
    kernel_format,
    set_weight_amax,
    weight_layers,
)

__all__ = [
    "gptq",
    "gptq_layers",
    "gptq_quantize",
    "inverse_hessian_factor",
    "lower_triangular_inverse",
]


def inverse_hessian_factor(hessian: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1 = U^T U`` with ``λ = percdamp·mean(diag H)``, batched.

    With ``J`` the index reversal and ``J H J = L L^T``, ``U = J L^-1 J`` (upper, positive
    diagonal): one Cholesky and one triangular solve, no explicit inverse. Damping grows
    tenfold (up to five times) while the factorization fails.
    """
    n = hessian.shape[-1]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-8)
    flipped = hessian.flip(-1, -2)
    for attempt in range(6):
        damp = (percdamp * 10**attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(flipped + damp[..., None, None] * eye)
        if not bool(info.any()):
            return lower_triangular_inverse(chol).flip(-1, -2)
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping")


def lower_triangular_inverse(lower: Tensor, leaf: int = 128) -> Tensor:
    """Inverse of lower-triangular ``lower`` (..., n, n), batched, by recursive halving.

    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``: the off-diagonal block costs two
    matrix products, so the whole inverse takes about a third of the work of a triangular solve
    against the identity (which is what it does on blocks of at most ``leaf``).
    """
    n = lower.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    h = n // 2
    inv_a = lower_triangular_inverse(lower[..., :h, :h], leaf)
    inv_c = lower_triangular_inverse(lower[..., h:, h:], leaf)
    out = torch.zeros_like(lower)
    out[..., :h, :h] = inv_a
    out[..., h:, h:] = inv_c
    out[..., h:, :h] = -(inv_c @ (lower[..., h:, :h] @ inv_a))
    return out


class _ColumnQuantizer:
    """Quantizes one weight column at a time with the amax of each element's block.

    Columns are rows of the transposed working copy, (B, cols, rows), so that every per-column
    op reads contiguous memory. For plain grids (``fmt.grid``: INT or FP elements with float32
    scales) the per-column scales are computed once and each column costs a handful of
    element-wise ops (the same float32 arithmetic as the kernels); other formats call
    ``fmt.quant`` with the column's amax.
    """

    def __init__(self, fmt: BlockFormat, amax_blocks: Tensor, col_block: Tensor) -> None:
        self.fmt, self.amax_blocks = fmt, amax_blocks
        rows = amax_blocks.shape[-2]
        self._index = col_block.unsqueeze(1).expand(-1, rows, -1)  # (B, rows, cols)
        self.scale = self.divisor = None  # (B, cols, rows)
        if fmt.grid is not None:
            self.scale = torch.empty(
                self._index.mT.shape, dtype=torch.float32, device=amax_blocks.device
            )
            self.divisor = torch.empty_like(self.scale)
            self.refresh(slice(None))

    def amax(self, cols: slice) -> Tensor:
        """Amax of the elements of the columns ``cols`` (permuted order), (B, rows, n)."""
        return self.amax_blocks.gather(-1, self._index[..., cols])

    def refresh(self, cols: slice) -> None:
        """Recompute the scales of ``cols`` after their blocks' amax changed."""
        if self.scale is None:
            return
        scale = qk.grid_scale(self.amax(cols), self.fmt.grid).mT
        self.scale[:, cols] = scale
        self.divisor[:, cols] = torch.where(scale == 0, 1.0, scale)

    def __call__(self, x: Tensor, col: int, out: Tensor) -> None:
        """Quantize column ``col`` given as ``x`` (B, rows) into ``out`` (same shape and dtype)."""
        if self.scale is None:
            out.copy_(self.fmt.quant(x, self.amax(slice(col, col + 1)).squeeze(-1)))
            return
        target = out if out.dtype == torch.float32 else None  # float64 weights: float32 math
        scale, divisor = self.scale[:, col], self.divisor[:, col]
        v = qk.fake_quantize_with_scale(x, scale, self.fmt.grid, divisor=divisor, out=target)
        if target is None:
            out.copy_(v)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    fmt: BlockFormat,
    *,
    amax: Tensor | None = None,
    block_size: int = 16,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """GPTQ-round ``weight`` (B, rows, cols) given input Gram matrices ``hessian`` (B, cols, cols).

    Unbatched 2-D inputs are accepted too. Per-block amax comes from ``amax`` (B, rows, nb, 1),
    ``nb = ceil(cols / block)`` (the last block may be short), when given; otherwise from max |w|
    of each quantization block when its first column is reached (with ``act_order``, from the
    weight before any update, so that blocks stay contiguous in the original column order).
    Returns ``(quantized weight, amax)``; the quantized weight lies on the grid that ``amax``
    defines, so re-quantizing it is a no-op.
    """
    squeeze = weight.dim() == 2
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dtype)  # read only: the working copy is ``wt`` below
    # dead input channels: rounded to nearest, never zeroed (a copy: the caller's stays)
    h = fill_dead_channels(hessian.to(dtype))
    if squeeze:
        w, h = w.unsqueeze(0), h.unsqueeze(0)
        amax = None if amax is None else amax.unsqueeze(0)
    nbatch, rows, cols = w.shape
    group = fmt.block_size(cols)

    if act_order and amax is None:
        amax = fmt.amax(w)
    if act_order:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
    else:
        perm = torch.arange(cols, device=w.device).expand(nbatch, cols)
    # working copy with columns as rows (B, cols, rows), in the order they are quantized
    wt = w.mT.gather(-2, perm.unsqueeze(-1).expand(nbatch, cols, rows))
    # permuted Hessian, then its factor; each step frees the one before (they are cols^2 each)
    h = h.gather(-1, perm.unsqueeze(1).expand(nbatch, cols, cols))
    h = h.gather(-2, perm.unsqueeze(-1).expand(nbatch, cols, cols))
    hinv = inverse_hessian_factor(h, percdamp)
    del h

    fixed = amax is not None
    amax_blocks = (
        amax.squeeze(-1).to(w, copy=True)
        if fixed
        else torch.zeros(nbatch, rows, num_blocks(cols, group), dtype=w.dtype, device=w.device)
    )
    col_block = perm // group  # (B, cols): quantization block of each (permuted) column
    quant_cols = _ColumnQuantizer(fmt, amax_blocks, col_block)
    qt = torch.zeros_like(wt)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[..., i1:i2, i1:i2]
        d = hinv1.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, n, 1)
        for i in range(i2 - i1):
            col = i1 + i
            if not fixed and col % group == 0:
                current = torch.cat([w1[:, i:], wt[:, i2:]], dim=1)[:, :group]
                amax_blocks[..., col // group] = current.abs().amax(1)
                quant_cols.refresh(slice(col, min(col + group, cols)))
            x, qx, err = w1[:, i], qt[:, col], err1[:, i]
            quant_cols(x, col, out=qx)
            torch.sub(x, qx, out=err).div_(d[:, i])
            w1[:, i + 1 :].addcmul_(hinv1[:, i, i + 1 :].unsqueeze(-1), err.unsqueeze(1), value=-1)
        wt[:, i2:].sub_(hinv[..., i1:i2, i2:].mT @ err1)

    q = qt.scatter(-2, perm.unsqueeze(-1).expand(nbatch, cols, rows), qt.clone()).mT.contiguous()
    amax_out = amax_blocks.unsqueeze(-1)
    if squeeze:
        return q[0], amax_out[0]
    return q, amax_out


def _format_key(module: nn.Module) -> qk.QuantFormat:
    return first_stage(module.weight_quantizer).format


def _global_amax(module: nn.Module) -> bool:
    """Whether the layer's format has a global amax (NVFP4): its unit is a batch of its own."""
    return _format_key(module).has_global_amax


def _alone(module: nn.Module) -> bool:
    """Whether a layer's rows must not be stacked with another's (one per-tensor amax). NVFP4
    layers fed the same input are stacked: they share the unit's global amax, as the engines
    that fuse them (q/k/v, gate/up) need."""
    return kernel_format(module.weight_quantizer).per_tensor


def _batches(layers: dict[str, nn.Module], stats: dict) -> list[list[list[str]]]:
    """Group layers into units (same input and format: stacked rows) and units into batches
    (equal shape and format: one batched GPTQ run)."""
    units: dict[tuple, list[str]] = {}
    for name, module in layers.items():
        root = name if _alone(module) else stats[name].source or name
        units.setdefault((root, _format_key(module)), []).append(name)
    batches: dict[tuple, list[list[str]]] = {}
    for i, unit in enumerate(units.values()):
        first = layers[unit[0]]
        rows = sum(layers[n].weight.shape[0] for n in unit)
        key = (rows, first.weight.shape[1], _format_key(first), i if _global_amax(first) else -1)
        batches.setdefault(key, []).append(unit)
    return list(batches.values())


@register_algorithm("gptq")
def gptq(
    model: nn.Module,
    forward_loop: Callable | None = None,
    percdamp: float = 0.01,
    block_size: int = 16,
    act_order: bool = True,
    clip_search: bool = True,
) -> None:
    """The ``gptq`` algorithm on every quantized Linear weight, from one calibration pass.

    Layers fed the same input (q/k/v) are stacked into one matrix, and matrices of equal shape
    and format run as one batch. Options: ``percdamp`` (damping, a fraction of mean diag H),
    ``block_size`` (columns per lazy update: it changes speed, not the result; small blocks
    are fastest on CPU), ``act_order`` (columns by decreasing diag H), ``clip_search`` (choose
    each block's amax first by a clip search on its output error, with input channels weighted
    by diag H for block formats and the full ``d^T H d`` for rows of per-channel / per-tensor
    formats; otherwise max |w| of the block). Without a ``forward_loop`` it warns and runs ``max``.
    """
    if not 0 <= percdamp < 1 or block_size < 1:
        raise ValueError(
            f"gptq: need 0 <= percdamp < 1 and block_size >= 1, got {percdamp}, {block_size}"
        )
    if forward_loop is None:
        # Built-in FP8 configs use gptq; without data they behave as ModelOpt's (max).
        warnings.warn(
            "gptq: no forward_loop, so no Hessians: weights are rounded to nearest (max)",
            stacklevel=2,
        )
        max_calibrate(model, None)
        return
    layers = {
        n: m
        for n, m in weight_layers(model).items()
        if kernel_format(m.weight_quantizer) is not None
    }
    stats = calibrate_with_stats(model, forward_loop, layers, gram=True)
    gptq_layers(layers, stats, percdamp, block_size, act_order, clip_search)


def gptq_layers(
    layers: dict[str, nn.Module],
    stats: dict,
    percdamp: float = 0.01,
    block_size: int = 16,
    act_order: bool = True,
    clip_search: bool = True,
    input_scales: dict[str, Tensor] | None = None,
) -> None:
    """GPTQ-round the weights of ``layers`` given their input statistics ``stats`` (with Gram
    matrices, from :func:`calibrate_with_stats`); see :func:`gptq` for the options.

    Layers of one unit (same input) must share their pre-quant scale: the unit's Hessian is its
    first layer's effective one. ``input_scales`` maps a unit's first layer to an input scale
    ``s`` (AWQ's): that unit is rounded both as it is and with its input divided by ``s`` (its
    weight times ``s``), in the same batched run, and keeps whichever leaves the smaller output
    error ``tr(Δ H Δᵀ)`` on the calibration inputs; its layers then get the pre-quant scale
    ``1/s``, or ones (so that every such layer exports alike).
    """
    input_scales = input_scales or {}
    for units in tqdm(_batches(layers, stats), desc="gptq", leave=False):
        weights = torch.stack(
            [torch.cat([layers[n].weight.detach().float() for n in u]) for u in units]
        )
        gram = torch.stack([effective_input_stats(layers[u[0]], stats[u[0]]).gram for u in units])
        hessian = fill_dead_channels(gram, [", ".join(u) for u in units])
        quantizer = layers[units[0][0]].weight_quantizer
        scaled = [b for b, u in enumerate(units) if u[0] in input_scales]
        gram = gram[scaled]  # the raw Gram matrices are needed for the choice only
        variants = [(weights, hessian)]
        if scaled:
            s = torch.stack([input_scales[units[b][0]].float().to(weights) for b in scaled])
            inv = 1.0 / s  # the pre-quant scale the layers get
            # the scaled inputs' Gram matrix in effective_input_stats' float order: GPTQ amplifies
            # one-ulp differences (SmolLM2 INT4 g64 perplexity moved 0.9% with the other order)
            h = gram * inv.unsqueeze(-2) * inv.unsqueeze(-1)
            variants.append((weights[scaled] * s.unsqueeze(-2), fill_dead_channels(h)))
            del h
        if not first_stage(quantizer).format.has_global_amax:  # one batched run for both
            variants = [tuple(torch.cat(parts) for parts in zip(*variants, strict=True))]
        del hessian
        rounded = []
        with torch.no_grad():
            while variants:  # popped: a variant's inputs are freed once it is rounded
                w, h = variants.pop(0)
                rounded.append(
                    _round_batch(quantizer, w, h, percdamp, block_size, act_order, clip_search)
                )
                del w, h
        q = torch.cat([r[0] for r in rounded]) if len(rounded) > 1 else rounded[0][0]
        amax = torch.cat([r[1] for r in rounded]) if len(rounded) > 1 else rounded[0][1]
        fmts = [fmt for _q, a, fmt, _g in rounded for _ in range(len(a))]
        globals_ = [g for _q, a, _f, g in rounded for _ in range(len(a))]
        for b, unit in enumerate(units):
            pick, scale = b, None
            if b in scaled:
                k = scaled.index(b)
                j, scale = len(units) + k, s[k]
                plain_err = output_error(q[b].double() - weights[b].double(), gram[k].double())
                scaled_q = q[j].double() * inv[k].double()
                if output_error(scaled_q - weights[b].double(), gram[k].double()) < plain_err:
                    pick = j
                else:
                    scale = None
            _write_unit(
                layers,
                unit,
                stats,
                q[pick],
                amax[pick],
                fmts[pick],
                globals_[pick],
                scale,
                pre_quant_ones=b in scaled,
            )


def _round_batch(
    quantizer: nn.Module,
    weights: Tensor,
    hessian: Tensor,
    percdamp: float,
    block_size: int,
    act_order: bool,
    clip_search: bool,
) -> tuple[Tensor, Tensor, BlockFormat, Tensor | None]:
    """One batched GPTQ run: ``(quantized weights, amax, format, global amax or None)``."""
    fmt = kernel_format(quantizer)
    stage_format = first_stage(quantizer).format
    block_scaled = stage_format.scale_mode is not qk.ScaleMode.FLOAT32
    amax = None
    if clip_search:
        # blocks: channels weighted by diag H (as good as d^T H_bb d on MiniLM, half the
        # cost); whole rows (per channel / per tensor): the row's full d^T H d
        ratios = torch.arange(1.0, 0.49, -0.05)
        if fmt.block is None:
            amax = mse_amax(weights, fmt, ratios, hessian=hessian)
        else:
            diag = hessian.diagonal(dim1=-2, dim2=-1)
            amax = mse_amax(weights, fmt, ratios, hessian_diag=diag)
    elif fmt.per_tensor or block_scaled:
        amax = fmt.amax(weights)
    global_amax = None
    if amax is not None and stage_format.has_global_amax:  # (block scaled: NVFP4)
        global_amax = qk.nvfp4_global_amax(block_amax=amax)  # one unit per batch: its max
        fmt = kernel_format(quantizer, global_amax=global_amax)
    q, amax = gptq_quantize(
        weights,
        hessian,
        fmt,
        amax=amax,
        block_size=block_size,
        percdamp=percdamp,
        act_order=act_order,
    )
    return q, amax, fmt, global_amax


def _write_unit(
    layers: dict[str, nn.Module],
    unit: list[str],
    stats: dict,
    q: Tensor,
    amax: Tensor,
    fmt: BlockFormat,
    global_amax: Tensor | None,
    scale: Tensor | None,
    pre_quant_ones: bool,
) -> None:
    """Give the layers of ``unit`` their rows of ``q`` and ``amax``; with ``scale``, first divide
    their input by it (:func:`apply_input_scale`), else a pre-quant scale of ones if asked."""
    start = 0
    with torch.no_grad():
        for name in unit:
            module = layers[name]
            rows = module.weight.shape[0]
            if scale is not None:
                apply_input_scale(module, scale, stats[name].amax, recalibrate=False)
            elif pre_quant_ones and module.input_quantizer.pre_quant_scale is None:
                module.input_quantizer.pre_quant_scale = torch.ones(module.weight.shape[1])
            module.weight.copy_(q[start : start + rows].to(module.weight.dtype))
            set_weight_amax(module, amax[start : start + rows], fmt)
            if global_amax is not None:  # the rounding above used the unit's global
                first_stage(module.weight_quantizer).global_amax = global_amax
            start += rows
