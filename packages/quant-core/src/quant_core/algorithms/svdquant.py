"""SVDQuant: a low-rank high-precision branch absorbs the outliers, the residual is quantized.

After AWQ-style smoothing (``x / s``, ``W s``) the smoothed weight is split into
``L R + (W s - L R)``: the rank-``r`` part ``L R`` (from the SVD) stays in high precision and only
the residual goes through the quantizer (Li et al., 2024). With ``iters > 1`` the low-rank
part is refit to what the quantized residual misses, which lowers the error further.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant_core.algorithms.awq import awq_scales
from quant_core.algorithms.output_error import output_error
from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.statistics import calibrate_with_stats, effective_input_stats
from quant_core.algorithms.weights import (
    BlockFormat,
    apply_input_scale,
    calibrate_weight,
    kernel_format,
    weight_layers,
)

__all__ = ["low_rank_split", "svdquant", "svdquant_search"]


def low_rank_split(
    weight: Tensor, fmt: BlockFormat, rank: int, iters: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``weight`` (..., rows, cols) into ``lora_b @ lora_a`` plus a quantized residual.

    Returns ``(lora_a (..., rank, cols), lora_b (..., rows, rank), quantized residual)``.
    """
    target = weight
    for _ in range(max(1, iters)):
        u, sv, vh = torch.linalg.svd(target, full_matrices=False)
        lora_b = u[..., :rank] * sv[..., None, :rank]
        lora_a = vh[..., :rank, :]
        residual_q = fmt(weight - lora_b @ lora_a)
        target = weight - residual_q
    return lora_a, lora_b, residual_q


def svdquant_search(
    weight: Tensor,
    act_mean: Tensor,
    hessian: Tensor,
    fmt: BlockFormat,
    rank: int = 32,
    alphas: Tensor | None = None,
    iters: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pick the smoothing ``α`` whose low-rank split gives the lowest layer output error.

    Returns ``(scales, lora_a, lora_b, quantized residual)`` in the smoothed space: the layer
    computes ``(x / s) (residual_q + lora_b lora_a)^T``.
    """
    if alphas is None:
        alphas = torch.linspace(0.0, 1.0, 6)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    s = awq_scales(act_mean.to(w), alphas.to(w)).unsqueeze(1)  # (A, 1, cols)
    lora_a, lora_b, res_q = low_rank_split(w * s, fmt, rank, iters)
    delta = (res_q + lora_b @ lora_a) / s - w
    i = int(output_error(delta, hessian.to(w)).argmin())
    return s[i, 0], lora_a[i], lora_b[i], res_q[i]


@register_algorithm("svdquant")
def svdquant(
    model: nn.Module,
    forward_loop: Callable | None = None,
    lowrank: int = 32,
    alphas: int = 6,
    iters: int = 1,
) -> None:
    """The ``svdquant`` algorithm on every quantized Linear weight.

    Each layer gets AWQ-style smoothing (``α`` searched over ``alphas`` values), a rank-``lowrank``
    branch kept in high precision (``QuantModule.set_low_rank_branch``: part of the module's state,
    so ``save`` / ``restore`` keep it) and its weight replaced by the residual that the weight quantizer quantizes.
    """
    if lowrank < 1 or alphas < 1:
        raise ValueError(f"svdquant: lowrank and alphas must be >= 1, got {lowrank}, {alphas}")
    layers = {
        n: m
        for n, m in weight_layers(model).items()
        if kernel_format(m.weight_quantizer) is not None
    }
    stats = calibrate_with_stats(model, forward_loop, layers, gram=True)
    for name, module in tqdm(layers.items(), desc="svdquant", leave=False):
        st = effective_input_stats(module, stats[name])
        fmt = kernel_format(module.weight_quantizer)
        rank = min(lowrank, *module.weight.shape)
        with torch.no_grad():
            s, lora_a, lora_b, _ = svdquant_search(
                module.weight.detach(),
                st.abs_mean,
                st.gram,
                fmt,
                rank,
                torch.linspace(0, 1, alphas),
                iters,
            )
            apply_input_scale(module, s, stats[name].amax, recalibrate=False)
            module.weight.sub_((lora_b @ lora_a).to(module.weight.dtype))
            calibrate_weight(module)
            module.set_low_rank_branch(lora_a, lora_b)
