"""The ``mse`` algorithm: per-block weight amax searched for the least quantization error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_core.algorithms.output_error import mse_amax
from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.statistics import calibrate_with_stats
from quant_core.algorithms.weight_mse import make_weight_mse_calibrator
from quant_core.algorithms.weights import (
    calibrate_weight,
    first_stage,
    kernel_format,
    set_weight_amax,
    weight_layers,
)

__all__ = ["mse_calibrate"]


@register_algorithm("mse")
def mse_calibrate(model: nn.Module, forward_loop: Callable | None = None, **options: Any) -> None:
    """The ``mse`` algorithm: max-calibrate, then search each weight's per-block amax for least MSE.

    Options: ``num_steps`` (41), ``start_multiplier`` (0.5, the smallest ratio of max |w| tried),
    ``stop_multiplier`` (1.0). ``fp8_scale_sweep=True`` (ModelOpt's option) instead calibrates only
    the weights whose custom backend has a registered sweep calibrator
    (:func:`quant_core.algorithms.weight_mse.register_fp8_sweep_calibrator`), leaving the others at
    their max amax; static NVFP4 weights are refused by name.
    """
    unknown = set(options) - {"num_steps", "start_multiplier", "stop_multiplier", "fp8_scale_sweep"}
    if unknown:
        raise ValueError(f"mse: unknown option(s) {sorted(unknown)}")
    if options.pop("fp8_scale_sweep", False):
        calibrate_with_stats(model, forward_loop, {})
        for module in weight_layers(model).values():
            _backend_sweep(module)
        return
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


def _backend_sweep(module: nn.Module) -> None:
    """A layer's first weight stage calibrated by its backend's registered sweep calibrator."""
    quantizer = first_stage(module.weight_quantizer)
    cal = make_weight_mse_calibrator(quantizer, 0.1, 0.25, 4.0, fp8_scale_sweep=True)
    if cal is None:
        return
    with torch.no_grad():
        cal.collect(module.weight.detach())
        amax = cal.compute_amax()
        if amax is not None:
            quantizer.amax = amax.reshape(quantizer.amax.shape)
            calibrate_weight(module, first=1)
