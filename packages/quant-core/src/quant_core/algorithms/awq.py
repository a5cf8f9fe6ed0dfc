"""AWQ: activation-aware weight quantization (lite: scale search, clip: clipping search, full: both).

All searches score a candidate by the layer's output error on the calibration inputs,
``||X (W_q - W)^T||^2 = tr(ΔW H ΔW^T)`` with ``H = X^T X`` gathered once by a forward hook, so a
candidate costs one quantization and one matrix product and no extra forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant_core.algorithms._blocks import from_blocks, to_blocks
from quant_core.algorithms.output_error import (
    block_output_error,
    hessian_diag_blocks,
    mse_amax,
    scaled_hessian,
)
from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.statistics import calibrate_with_stats, effective_input_stats
from quant_core.algorithms.weights import (
    BlockFormat,
    apply_input_scale,
    kernel_format,
    set_weight_amax,
    weight_layers,
)

__all__ = [
    "AWQClipDebug",
    "AWQLiteDebug",
    "awq",
    "awq_clip",
    "awq_clip_search",
    "awq_full",
    "awq_lite",
    "awq_scale_search",
    "awq_scales",
    "relative_weight_mean",
    "scoring_block",
]


def awq_scales(act_mean: Tensor, alpha: Tensor, weight_mean: Tensor | None = None) -> Tensor:
    """Per-input-channel scales ``mean|x|^α / mean|ŵ|^(1-α)`` normalized so that max·min = 1.

    ``weight_mean`` is the mean per input channel of |w| relative to its block's max (ŵ); None
    drops the weight term (AWQ's original ``mean|x|^α``). Shape (A, in) for A values of ``alpha``.
    """
    a = alpha.view(-1, 1)
    s = act_mean.clamp(min=1e-6).unsqueeze(0).pow(a)
    if weight_mean is not None:
        s = (s / (weight_mean.unsqueeze(0).pow(1 - a) + 1e-4)).clamp(min=1e-4)
    return s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()


def relative_weight_mean(weight: Tensor, fmt: BlockFormat) -> Tensor:
    """Mean over output channels of |w| / (its block's max |w|), per input channel."""
    relative = fmt.blocks(weight).abs() / fmt.amax(weight).clamp(min=1e-12)
    return from_blocks(relative, weight.shape[-1]).mean(-2)


def scoring_block(fmt: BlockFormat, cols: int) -> int:
    """Columns per diagonal block of ``H`` that the scale search scores with: the quantization
    block, widened to a multiple of it of at least 128 columns (NVFP4's 16, MX's 32), so that
    correlations between neighbouring small blocks still count."""
    block = fmt.block_size(cols)
    return block * max(1, -(-min(128, cols) // block))


def awq_scale_search(
    weight: Tensor,
    act_mean: Tensor,
    hessian: Tensor,
    fmt: BlockFormat,
    alphas: Tensor | None = None,
    chunk_elems: int = 1 << 23,
    errors: dict[float, float] | None = None,
) -> tuple[float, Tensor]:
    """Search ``α`` so that quantizing ``W s`` and dividing the input by ``s`` minimizes output error.

    ``act_mean`` is mean |x| per input channel, ``hessian`` is ``X^T X``; the candidates are
    :func:`awq_scales` with the weight term, plus no scaling at all (reported as α = -1). Each is
    scored by the block-diagonal part of the output error, ``sum_b d_b^T H_bb d_b`` over blocks
    ``b`` of :func:`scoring_block` columns (rounding errors of distant columns are nearly
    uncorrelated, and the full ``tr(Δ H Δ^T)`` costs ``cols / block`` times more), so the result
    is never worse than plain rounding by that measure. Returns ``(alpha, scales)``; ``errors``,
    when given, receives each candidate's error by its α.
    """
    if alphas is None:
        alphas = torch.linspace(0.0, 1.0, 11)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    h = hessian.to(w)
    a = alphas.to(w)
    cands = torch.cat(
        [
            torch.ones(1, w.shape[-1], dtype=w.dtype, device=w.device),
            awq_scales(act_mean.to(w), a, relative_weight_mean(w, fmt)),
        ]
    )
    labels = torch.cat([torch.full((1,), -1.0, dtype=w.dtype), a.cpu()])
    size = scoring_block(fmt, w.shape[-1])
    h_blocks = hessian_diag_blocks(h, size)
    per_batch = max(1, chunk_elems // w.numel())
    best_err, best = float("inf"), 0
    for start in range(0, len(cands), per_batch):
        s = cands[start : start + per_batch].unsqueeze(1)  # (A, 1, in)
        delta = to_blocks(
            fmt(w * s).div_(s).sub_(w), size
        )  # in place: no page-faulting temporaries
        err = block_output_error(delta, h_blocks).sum((-2, -1))
        if errors is not None:
            errors.update(zip(labels[start : start + len(err)].tolist(), err.tolist()))
        i = int(err.argmin())
        if float(err[i]) < best_err:
            best_err, best = float(err[i]), start + i
    return float(labels[best]), cands[best]


def awq_clip_search(
    weight: Tensor, hessian: Tensor, fmt: BlockFormat, ratios: Tensor | None = None
) -> Tensor:
    """Per-block clipping: amax ``r·max|w_b|`` minimizing each block's output error ``d^T H_bb d``."""
    if ratios is None:
        ratios = torch.linspace(1.0, 0.5, 21)
    return mse_amax(
        weight.to(torch.promote_types(weight.dtype, torch.float32)),
        fmt,
        ratios=ratios,
        hessian=hessian,
    )


@dataclass
class AWQLiteDebug:
    """What ``awq_lite`` / ``awq_full`` with ``debug=True`` leave on each layer as ``awq_lite``
    (ModelOpt's attribute names): the mean |x| per input channel, each α's output error (α = -1:
    no scaling), the chosen α and scales."""

    name: str
    act_scale: Tensor
    loss: dict[float, float] = field(default_factory=dict)
    best_alpha: float | None = None
    best_scale: Tensor | None = None


@dataclass
class AWQClipDebug:
    """What ``awq_clip`` / ``awq_full`` with ``debug=True`` leave on each layer as ``awq_clip``:
    the per-block max |w| before clipping (``w_amax``) and the chosen clipped amax."""

    name: str
    w_amax: Tensor
    best_amax: Tensor | None = None


def awq(
    model: nn.Module,
    forward_loop: Callable | None,
    *,
    scale: bool,
    clip: bool,
    alpha_step: float = 0.1,
    min_clip_ratio: float = 0.5,
    shrink_step: float = 0.05,
    desc: str = "awq",
    debug: bool = False,
) -> None:
    """AWQ on every quantized Linear weight: per-channel scale search and/or per-block clip search.

    One calibration pass gathers mean |x| and ``X^T X`` per layer; each layer then searches
    ``α`` in steps of ``alpha_step`` and clipping ratios from 1 down to ``min_clip_ratio`` in
    steps of ``shrink_step``. Scales go to the input quantizer's ``pre_quant_scale`` (weight
    multiplied by them); clipped amaxes to the weight quantizer. ``debug=True`` leaves the
    search's per-layer record on each layer (:class:`AWQLiteDebug` as ``awq_lite``,
    :class:`AWQClipDebug` as ``awq_clip``), as ModelOpt does.
    """
    if not 0 < alpha_step <= 1 or not 0 < shrink_step < 1 or not 0 < min_clip_ratio <= 1:
        raise ValueError(
            f"{desc}: need 0 < alpha_step <= 1, 0 < shrink_step < 1, 0 < min_clip_ratio <= 1; got "
            f"{alpha_step}, {shrink_step}, {min_clip_ratio}"
        )
    formats = {n: kernel_format(m.weight_quantizer) for n, m in weight_layers(model).items()}
    formats = {n: fmt for n, fmt in formats.items() if fmt is not None}
    layers = {n: m for n, m in weight_layers(model).items() if n in formats}
    # the searches read only the Gram matrix's diagonal blocks (see scoring_block)
    blocks = {fmt.block and scoring_block(fmt, layers[n].in_features) for n, fmt in formats.items()}
    gram = blocks.pop() if len(blocks) == 1 and None not in blocks else True
    stats = calibrate_with_stats(model, forward_loop, layers, gram=gram)
    alphas = torch.arange(0.0, 1.0 + 1e-6, alpha_step)
    ratios = torch.arange(1.0, min_clip_ratio - 1e-6, -shrink_step)
    for name, module in tqdm(layers.items(), desc=desc, leave=False):
        st = effective_input_stats(module, stats[name])
        fmt = formats[name]
        hessian = st.gram
        with torch.no_grad():
            if scale:
                errors: dict[float, float] | None = {} if debug else None
                alpha, s = awq_scale_search(
                    module.weight.detach(), st.abs_mean, hessian, fmt, alphas, errors=errors
                )
                if debug:
                    module.awq_lite = AWQLiteDebug(
                        name, st.abs_mean.detach().clone(), errors or {}, alpha, s.detach().clone()
                    )
                apply_input_scale(module, s, stats[name].amax, recalibrate=not clip)
                hessian = scaled_hessian(hessian, s)
            if clip:
                if debug:  # the per-block max |w| of the weight the clip search reads
                    w = module.weight.detach().float()
                    w_amax = to_blocks(w, fmt.block_size(w.shape[-1])).abs().amax(-1, keepdim=True)
                amax = awq_clip_search(module.weight.detach(), hessian, fmt, ratios)
                if debug:
                    module.awq_clip = AWQClipDebug(name, w_amax, amax.detach().clone())
                set_weight_amax(module, amax, fmt)


@register_algorithm("awq_lite")
def awq_lite(model: nn.Module, forward_loop: Callable | None = None, **options: Any) -> None:
    """The ``awq_lite`` algorithm: activation-aware per-channel scales (see :func:`awq`)."""
    awq(model, forward_loop, scale=True, clip=False, desc="awq_lite", **options)


@register_algorithm("awq_clip")
def awq_clip(model: nn.Module, forward_loop: Callable | None = None, **options: Any) -> None:
    """The ``awq_clip`` algorithm: per-block clipping ratios minimizing output error (see :func:`awq`)."""
    awq(model, forward_loop, scale=False, clip=True, desc="awq_clip", **options)


@register_algorithm("awq_full")
def awq_full(model: nn.Module, forward_loop: Callable | None = None, **options: Any) -> None:
    """The ``awq_full`` algorithm: scales, then clipping on the scaled weight (see :func:`awq`)."""
    awq(model, forward_loop, scale=True, clip=True, desc="awq_full", **options)
