"""The ``local_hessian`` algorithm (ModelOpt 0.47): per-block weight amax searched for the least
local-Hessian-weighted error ``d_b^T H_bb d_b``, with ``H_bb`` the block's diagonal block of the
input Gram matrix ``X^T X`` — the output error the block's rounding causes, ignoring correlations
with other blocks. Candidates are ``m * max|w_b|`` for ``m`` from ``start_multiplier`` to
``stop_multiplier`` in steps of ``step_size``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_core.algorithms.output_error import mse_amax, scaled_hessian
from quant_core.algorithms.registry import ForwardLoop, register_algorithm
from quant_core.algorithms.statistics import calibrate_with_stats
from quant_core.algorithms.weights import first_stage, kernel_format, set_weight_amax, weight_layers
from quant_core.diagnostics import name_list, warn


@register_algorithm("local_hessian")
def local_hessian(
    model: nn.Module,
    forward_loop: ForwardLoop | None = None,
    step_size: float = 0.1,
    start_multiplier: float = 0.25,
    stop_multiplier: float = 4.0,
    fp8_scale_sweep: bool = False,
    block_size: int | None = None,
    distributed_sync: bool = True,
) -> None:
    """Max-calibrate while recording each quantized Linear's block-diagonal input Gram matrix, then
    search every block-wise weight's per-block amax for the least ``d^T H_bb d`` (``block_size``,
    when given, must be the weights' block size, as ModelOpt requires). Without a
    ``forward_loop`` (ModelOpt refuses) each block's plain squared error is searched, as ``mse``
    does."""
    if fp8_scale_sweep:
        raise ValueError(
            "local_hessian: fp8_scale_sweep=True (sweeping the 128 E4M3 block scales under a fixed "
            "global scale) is not supported: a static NVFP4 global amax is its largest block amax "
            "here; use the multiplier sweep (fp8_scale_sweep=False)"
        )
    if step_size <= 0 or not 0 < start_multiplier <= stop_multiplier:
        raise ValueError(
            "local_hessian needs step_size > 0 and 0 < start_multiplier <= stop_multiplier, got "
            f"{step_size}, {start_multiplier}, {stop_multiplier}"
        )
    if not distributed_sync:
        raise ValueError("local_hessian: distributed_sync=False is not supported (amax is synced)")
    count = math.floor((stop_multiplier - start_multiplier) / step_size + 1e-9) + 1
    ratios = start_multiplier + step_size * torch.arange(count, dtype=torch.float64)
    layers = {
        name: m
        for name, m in weight_layers(model).items()
        if (fmt := kernel_format(m.weight_quantizer)) is not None and fmt.block is not None
    }
    _say_unsearched(model, layers)
    sizes = {kernel_format(m.weight_quantizer).block for m in layers.values()}
    if block_size is not None and sizes - {block_size}:
        raise ValueError(
            f"local_hessian: block_size={block_size} differs from the weight block sizes {sorted(sizes)}"
        )
    # the Gram blocks the search reads: one block size for all layers, else the whole matrix
    gram = sizes.pop() if len(sizes) == 1 else True
    # without calibration data (forward_loop None) there is no Gram matrix: each block's own
    # squared error is searched instead, as "mse" does (ModelOpt needs data here)
    stats = calibrate_with_stats(
        model, forward_loop, layers if forward_loop is not None else {}, gram=gram
    )
    for name, module in tqdm(layers.items(), desc="local_hessian", leave=False):
        fmt = kernel_format(module.weight_quantizer)
        hessian = stats[name].gram.float() if name in stats else None
        w = module.weight.detach().float()
        pqs_w = first_stage(module.weight_quantizer).pre_quant_scale
        if pqs_w is not None:
            w = w * pqs_w.float()
        pqs_x = module.input_quantizer.pre_quant_scale
        if pqs_x is not None and hessian is not None:  # the Gram of what the weight multiplies
            hessian = scaled_hessian(hessian, 1.0 / pqs_x.float().reshape(-1))
        with torch.no_grad():
            amax = mse_amax(w, fmt, ratios.to(w.dtype), hessian=hessian)
            set_weight_amax(module, amax, fmt)


def _say_unsearched(model: nn.Module, searched: dict[str, nn.Module]) -> None:
    """A QuantWarning naming the enabled static weight quantizers without blocks (per-channel or
    per-tensor): local_hessian searches per-block amaxes only, so these keep their max amax."""
    kept = []
    for name, module in weight_layers(model).items():
        quantizer = first_stage(module.weight_quantizer)
        if name in searched or not quantizer.is_enabled or quantizer.format.dynamic:
            continue
        kept.append(name)
    if kept:
        shown = name_list(kept)
        warn(
            f"local_hessian searches block-wise weight amaxes only; the weights of {shown} have no "
            "blocks (per-channel or per-tensor) and keep their max-calibrated amax (use 'mse' or "
            "'gptq' to refine those)",
            stacklevel=3,
        )


__all__ = ["local_hessian"]
