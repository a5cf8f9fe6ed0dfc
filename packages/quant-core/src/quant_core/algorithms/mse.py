"""Block-wise weight formats as seen by the calibration algorithms, and the MSE amax search.

Every weight algorithm (MSE, AWQ, GPTQ, SVDQuant) works on a 2-D weight ``(rows, cols)`` cut
into blocks of ``block`` columns (one amax per row and block; a whole row when ``block`` is
None). A block size that does not divide ``cols`` is handled as the kernels do: the columns
are zero-padded to a multiple of the block (the last block is short) and there are
``ceil(cols / block)`` amaxes per row. A :class:`BlockFormat` pairs that layout with an element-wise fake-quantizer
``quant(x, amax)`` (the format's numerics, e.g. ``quant_kernels.fake_quantize``), so the
algorithms run unchanged for INT4/INT8 block-wise, FP8, NVFP4 or MX weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quant_kernels as qk
from quant_core.algorithms._blocks import from_blocks, pad_gram, to_blocks
from quant_core.algorithms.registry import register_algorithm
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer
from quant_kernels.reference import divide, round_to_grid_

__all__ = [
    "BlockFormat",
    "Grid",
    "QuantFn",
    "block_output_error",
    "grid_fake_quant",
    "hessian_diag_blocks",
    "kernel_format",
    "mse_amax",
    "mse_calibrate",
    "recalibrate_weight",
    "set_weight_amax",
    "weight_layers",
]

QuantFn = Callable[[Tensor, Tensor], Tensor]
"""``quant(x, amax) -> x_q``: fake-quantizes ``x`` element-wise with a broadcastable amax."""


@dataclass(frozen=True)
class Grid:
    """An element grid with float32 scales: INT codes or FP values in ``[lo, hi]``."""

    element: qk.ElementFormat
    lo: float
    hi: float


@dataclass(frozen=True)
class BlockFormat:
    """A weight format for the algorithms: element quantizer plus block layout along columns."""

    quant: QuantFn
    block: int | None = None
    per_tensor: bool = False
    grid: Grid | None = None
    """Set when ``quant`` is a plain grid (INT or FP elements) with float32 scale ``amax / hi``:
    ``x_q = round_to_grid(clamp(x / scale, lo, hi)) * scale`` (lets callers inline it)."""

    def block_size(self, cols: int) -> int:
        """Columns per block for a weight with ``cols`` columns (the last block may be shorter)."""
        return cols if self.block is None else self.block

    def blocks(self, w: Tensor) -> Tensor:
        """View ``w`` (..., rows, cols) as (..., rows, ceil(cols / block), block), zero-padded."""
        return to_blocks(w, self.block_size(w.shape[-1]))

    def amax(self, w: Tensor) -> Tensor:
        """Per-block max |w| of shape (..., rows, n_blocks, 1) (one value repeated if per tensor)."""
        amax = self.blocks(w).abs().amax(-1, keepdim=True)
        if self.per_tensor:
            amax = amax.amax((-3, -2), keepdim=True).expand_as(amax)
        return amax

    def __call__(self, w: Tensor, amax: Tensor | None = None) -> Tensor:
        """Fake-quantize ``w`` (..., rows, cols) with per-block ``amax`` (max |w| per block if None)."""
        if amax is None:
            amax = self.amax(w)
        return from_blocks(self.quant(self.blocks(w), amax), w.shape[-1])


def block_output_error(delta: Tensor, hessian_blocks: Tensor) -> Tensor:
    """Per-block output error ``d_b^T H_bb d_b`` of a weight error ``delta`` (..., rows, nb, bs).

    ``hessian_blocks`` holds the diagonal blocks of the input Gram matrix ``X^T X`` with shape
    (..., nb, bs, bs), batch dims broadcasting with ``delta``'s.
    """
    errors = []
    # one (..., rows, bs) @ (bs, bs) product per block: 35% faster than one batched product over
    # a moved axis, which copies delta into (..., nb, rows, bs) first
    for b in range(delta.shape[-2]):
        d = delta[..., b, :]
        errors.append(torch.linalg.vecdot(d @ hessian_blocks[..., b, :, :], d))
    return torch.stack(errors, -1)


def hessian_diag_blocks(hessian: Tensor, size: int) -> Tensor:
    """The diagonal (size x size) blocks of square ``hessian`` (..., n, n): (..., ceil(n/size), size, size).

    When ``size`` does not divide ``n`` the last block is zero-padded (padded channels carry no signal).
    """
    hessian = pad_gram(hessian, size)
    n = hessian.shape[-1] // size
    split = hessian.unflatten(-1, (n, size)).unflatten(-3, (n, size))
    return split.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def mse_amax(
    w: Tensor,
    fmt: BlockFormat,
    ratios: Tensor | None = None,
    hessian: Tensor | None = None,
    chunk_elems: int = 1 << 24,
    hessian_diag: Tensor | None = None,
) -> Tensor:
    """Per-block amax ``r * max|w_b|`` minimizing the block's quantization error over ``ratios``.

    The error is the plain squared error, or the layer-output error ``d^T H_bb d`` when the input
    Gram matrix ``hessian`` (cols x cols) is given, or ``sum_j H_jj d_j^2`` when only its diagonal
    ``hessian_diag`` (cols,) is (about half the cost; it ignores correlations between input
    channels). Candidates are tried in batches of ``chunk_elems`` elements.
    Returns amax of shape (..., rows, ceil(cols / block), 1); the zero padding of a short last
    block quantizes to zero and so adds no error.
    """
    if ratios is None:
        ratios = torch.linspace(1.0, 0.5, 41)
    size = fmt.block_size(w.shape[-1])
    if hessian is not None and hessian_diag is not None:
        raise ValueError("mse_amax: give hessian or hessian_diag, not both")
    if hessian_diag is not None:
        h_blocks = to_blocks(hessian_diag.to(w.dtype), size)
    else:
        h_blocks = None if hessian is None else hessian_diag_blocks(hessian.to(w.dtype), size)

    def error(delta: Tensor) -> Tensor:  # (..., rows, nb, size), may be overwritten
        if hessian_diag is not None:
            return delta.square_().mul_(h_blocks.unsqueeze(-3)).sum(-1)
        if h_blocks is None:
            return delta.square_().sum(-1)
        return block_output_error(delta, h_blocks)

    blocks = fmt.blocks(w)
    base = fmt.amax(w)
    best_err = torch.full(base.shape[:-1], float("inf"), dtype=w.dtype, device=w.device)
    best = base.clone()
    per_batch = max(1, chunk_elems // max(1, w.numel()))
    ratios = ratios.to(w.device, w.dtype)
    # plain grids quantize into one reused buffer and the error is formed in place: fresh
    # candidate-sized tensors cost more in page faults than the arithmetic itself.
    work = None
    if fmt.grid is not None:
        shape = (min(per_batch, len(ratios)), *blocks.shape)
        work = torch.empty(shape, dtype=torch.float32, device=w.device)
    for start in range(0, len(ratios), per_batch):
        r = ratios[start : start + per_batch].view(-1, *([1] * base.dim()))
        cand = base * r
        if work is None:
            delta = fmt.quant(blocks, cand) - blocks
        else:
            delta = grid_fake_quant(blocks, cand, fmt.grid, out=work[: len(r)]).sub_(blocks)
        err = error(delta)
        if fmt.per_tensor:
            err = err.sum((-2, -1), keepdim=True).expand_as(err)
        err_min, idx = err.min(0)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        chosen = cand.squeeze(-1).gather(0, idx.unsqueeze(0)).squeeze(0).unsqueeze(-1)
        best = torch.where(better.unsqueeze(-1), chosen, best)
    return best


# ----- model side: formats of real quantizers, weight layers, writing results back ---------------
def first_stage(quantizer: nn.Module) -> TensorQuantizer:
    """The TensorQuantizer whose format the algorithms optimize (the first of a sequential chain)."""
    return quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer


def kernel_format(quantizer: nn.Module, global_amax: Tensor | None = None) -> BlockFormat | None:
    """The :class:`BlockFormat` of a Linear weight quantizer, or None when its layout is unsupported.

    Supported: blocks along the input dim, per output channel (axis 0) and per tensor. Numerics
    are ``quant_kernels.fake_quantize``; NVFP4's global amax is ``global_amax`` when given, else
    the largest amax of each call (as a static quantizer does).
    """
    q = first_stage(quantizer)
    if not q.is_enabled:
        return None
    qfmt = q.format
    axes = qfmt.block_axes
    if axes:
        if len(axes) != 1 or next(iter(axes)) not in (-1, 1):
            return None
        block, per_tensor = next(iter(axes.values())), False
    elif qfmt.axis in (0, -2):
        block, per_tensor = None, False
    elif qfmt.axis is None:
        block, per_tensor = None, True
    else:
        return None
    kwargs = qfmt.fake_quantize_kwargs()
    del kwargs["block_sizes"]
    if global_amax is not None and qfmt.has_global_amax:
        kwargs["global_amax"] = global_amax
    grid = _grid(qfmt) if qfmt.scale_mode == "float32" else None

    def quant(x: Tensor, amax: Tensor) -> Tensor:
        if grid is not None:
            return grid_fake_quant(x, amax, grid)
        lead = torch.broadcast_shapes(x.shape[:-1], amax.shape[:-1])
        x = x.expand(*lead, x.shape[-1])
        if amax.shape[-1] == 1 and x.shape[-1] > 1:
            amax = amax.expand(*lead, 1)
            return qk.fake_quantize(x, amax=amax, block_sizes={-1: x.shape[-1]}, **kwargs)
        amax = amax.expand_as(x)  # one amax per element: blocks of one along the last axis
        y = qk.fake_quantize(
            x.unsqueeze(-1), amax=amax.unsqueeze(-1), block_sizes={-1: 1}, **kwargs
        )
        return y.squeeze(-1)

    return BlockFormat(quant, block, per_tensor, grid)


def grid_fake_quant(x: Tensor, amax: Tensor, grid: Grid, out: Tensor | None = None) -> Tensor:
    """``quant_kernels.fake_quantize`` on a plain grid with ``amax`` broadcasting against ``x``
    (one amax per element or per block), in the kernels' float32 arithmetic (bit-identical
    results) without their layout work: the searches call it on many candidate amaxes at once.
    ``out`` (float32, the broadcast shape) receives the result when given."""
    scale = divide(amax.float(), grid.hi)
    v = torch.div(x.float(), torch.where(scale == 0, 1.0, scale), out=out)
    return round_to_grid_(v.clamp_(grid.lo, grid.hi), grid.element).mul_(scale).to(x.dtype)


def _grid(fmt: qk.QuantFormat) -> Grid:
    """The element grid of a format without block-scale format (INT codes or FP values)."""
    lo, hi = fmt.bounds
    return Grid(fmt.element, lo, hi)


def weight_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Quantized Linear layers whose weight quantizer is enabled, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and hasattr(m, "weight_quantizer")
        and m.weight_quantizer.is_enabled
    }


def recalibrate_weight(module: nn.Module) -> None:
    """Max-calibrate every stage of ``module.weight_quantizer`` on the current weight."""
    quantizer = module.weight_quantizer
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    with torch.no_grad():
        x = module.weight
        for stage in stages:
            if stage.is_enabled:
                stage.reset_amax()
                stage.collect(x)
                stage.load_calib_amax()
                x = stage(x)


def set_weight_amax(module: nn.Module, amax: Tensor, fmt: BlockFormat) -> None:
    """Store searched per-block ``amax`` (rows, n_blocks, 1) in the first weight-quantizer stage.

    A dynamic block quantizer (NVFP4, MX) becomes static so that the searched amax is used; the
    other stages of a sequential quantizer are max-calibrated on the first stage's output.
    """
    q = first_stage(module.weight_quantizer)
    if q.is_dynamic and q.block_sizes:
        q.block_sizes = {**q.block_sizes, "type": "static"}
    # A per-tensor amax arrives repeated for every block (BlockFormat.amax); store it once.
    q.amax = amax.amax() if fmt.per_tensor else amax.squeeze(-1)
    quantizer = module.weight_quantizer
    if isinstance(quantizer, SequentialQuantizer):
        with torch.no_grad():
            x = q(module.weight)
            for stage in list(quantizer)[1:]:
                if stage.is_enabled:
                    stage.reset_amax()
                    stage.collect(x)
                    stage.load_calib_amax()
                    x = stage(x)


@register_algorithm("mse")
def mse_calibrate(model: nn.Module, forward_loop: Callable | None = None, **options: Any) -> None:
    """The ``mse`` algorithm: max-calibrate, then search each weight's per-block amax for least MSE.

    Options: ``num_steps`` (41), ``start_multiplier`` (0.5, the smallest ratio of max |w| tried),
    ``stop_multiplier`` (1.0).
    """
    from quant_core.algorithms.smoothquant import calibrate_with_stats

    unknown = set(options) - {"num_steps", "start_multiplier", "stop_multiplier"}
    if unknown:
        raise ValueError(f"mse: unknown option(s) {sorted(unknown)}")
    ratios = torch.linspace(
        options.get("stop_multiplier", 1.0),
        options.get("start_multiplier", 0.5),
        options.get("num_steps", 41),
    )
    layers = weight_layers(model)
    calibrate_with_stats(model, forward_loop, {})
    for module in tqdm(layers.values(), desc="mse", leave=False):
        fmt = kernel_format(module.weight_quantizer)
        if fmt is None:
            continue
        with torch.no_grad():
            set_weight_amax(module, mse_amax(module.weight.float(), fmt, ratios), fmt)
