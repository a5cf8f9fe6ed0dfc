"""SmoothQuant: migrate activation outliers into the weights with per-input-channel scales.

For a linear layer ``y = x W^T`` the scale ``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` gives the same
float output as ``(x / s) (W s)^T`` while the scaled activations have a flatter range. ``α`` is
given, or searched per layer to minimize that layer's output error with both operands quantized.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.statistics import calibrate_with_stats, effective_input_stats
from quant_core.algorithms.weights import (
    BlockFormat,
    QuantFn,
    apply_input_scale,
    first_stage,
    input_format,
    kernel_format,
    weight_layers,
)

__all__ = ["search_smoothing", "smoothing_scales", "smoothquant"]


def smoothing_scales(
    act_amax: Tensor, weight_amax: Tensor, alpha: float | Tensor, floor: float = 1e-5
) -> Tensor:
    """SmoothQuant scales ``max|X_j|^α / max|W_:,j|^(1-α)``; channels with no signal get 1.

    ``alpha`` may be a tensor of several values (shape (A,)), giving scales of shape (A, in).
    """
    alpha = torch.as_tensor(alpha, dtype=act_amax.dtype, device=act_amax.device)
    a = act_amax.clamp(min=floor)
    w = weight_amax.clamp(min=floor)
    if alpha.dim():
        alpha = alpha.unsqueeze(-1)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (act_amax <= floor) | (weight_amax <= floor)
    return torch.where(dead, torch.ones_like(s), s)


def search_smoothing(
    weight: Tensor,
    x: Tensor,
    act_amax: Tensor,
    wfmt: BlockFormat,
    xquant: QuantFn | None,
    alphas: Tensor | None = None,
    chunk: int = 4,
) -> tuple[float, Tensor]:
    """Pick α (and the scales) minimizing ``||X W^T - Q(X/s) Q(W s)^T||^2`` on the rows ``x``.

    ``wfmt`` quantizes the scaled weight; ``xquant(x, amax)`` quantizes the scaled activations
    with the static per-tensor amax they would calibrate to (``max_j act_amax_j / s_j``); None
    leaves activations in float. Returns ``(alpha, scales)``.
    """
    if alphas is None:
        alphas = torch.linspace(0.0, 1.0, 11)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    x = x.to(w)
    ref = x @ w.T
    w_amax = w.abs().amax(0)
    best = (math.inf, 0.0, None)
    for start in range(0, len(alphas), chunk):
        a = alphas[start : start + chunk].to(w)
        s = smoothing_scales(act_amax.to(w), w_amax, a)  # (A, in)
        wq = wfmt(w.unsqueeze(0) * s.unsqueeze(1))
        xs = x.unsqueeze(0) / s.unsqueeze(1)
        if xquant is not None:
            x_amax = (act_amax.to(w) / s).amax(-1).view(-1, 1, 1)
            xs = xquant(xs, x_amax)
        err = (torch.bmm(xs, wq.transpose(1, 2)) - ref).square().sum((1, 2))
        i = int(err.argmin())
        if float(err[i]) < best[0]:
            best = (float(err[i]), float(a[i]), s[i])
    return best[1], best[2]


@register_algorithm("smoothquant")
def smoothquant(
    model: nn.Module,
    forward_loop: Callable | None = None,
    alpha: float | None = None,
    alphas: int = 11,
    max_samples: int = 1024,
) -> None:
    """The ``smoothquant`` algorithm on every Linear with quantized input and weight.

    ``alpha`` fixes the migration strength; None (default) searches ``alphas`` values in [0, 1]
    per layer for the least output error on up to ``max_samples`` calibration tokens.
    """
    layers = {
        n: m for n, m in weight_layers(model).items() if first_stage(m.input_quantizer).is_enabled
    }
    all_stats = calibrate_with_stats(
        model, forward_loop, layers, samples=max_samples if alpha is None else 0
    )
    grid = torch.linspace(0.0, 1.0, alphas)
    for name, module in tqdm(layers.items(), desc="smoothquant", leave=False):
        stats = effective_input_stats(module, all_stats[name])
        wfmt = kernel_format(module.weight_quantizer)
        if alpha is None and wfmt is not None:
            _, s = search_smoothing(
                module.weight.detach(),
                stats.sample_matrix(max_samples),
                stats.amax,
                wfmt,
                input_format(module),
                grid,
            )
        else:
            w_amax = module.weight.detach().float().abs().amax(0)
            s = smoothing_scales(stats.amax, w_amax, 0.5 if alpha is None else alpha)
        apply_input_scale(module, s, all_stats[name].amax)
        # the per-channel input amax, for disable_pre_quant_scale_and_resmooth and back
        first_stage(module.input_quantizer).register_buffer(
            "_amax_for_smoothing", all_stats[name].amax.detach().float().clone()
        )
