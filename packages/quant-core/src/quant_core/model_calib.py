"""ModelOpt's ``model_calib`` functions: each runs one calibration algorithm on a quantized model.

Each is ``mtq.calibrate(model, {"method": name, **options}, forward_loop)``; options the
algorithm here does not take are refused by name. ModelOpt's ``lsq``, ``local_hessian_calibrate``,
``nvfp4_act_headroom_calibrate`` and ``layerwise_calibrate`` are not provided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from quant_core.model_quant import calibrate

ForwardLoop = Callable[[nn.Module], Any] | None


def _run(method: str, model: nn.Module, forward_loop: ForwardLoop, options: dict[str, Any]) -> None:
    calibrate(model, {"method": method, **options}, forward_loop)


def max_calibrate(
    model: nn.Module, forward_loop: ForwardLoop = None, distributed_sync: bool = True
) -> None:
    """Max calibration: every static quantizer's amax is the maximum |x| it saw."""
    _run("max", model, forward_loop, {"distributed_sync": distributed_sync})


def mse_calibrate(model: nn.Module, forward_loop: ForwardLoop = None, **options: Any) -> None:
    """Weight amax searched for the least quantization MSE (after max calibration)."""
    _run("mse", model, forward_loop, options)


def smoothquant(
    model: nn.Module, forward_loop: ForwardLoop = None, alpha: float | None = None, **options: Any
) -> None:
    """SmoothQuant (``alpha=None`` searches the migration strength per layer)."""
    _run("smoothquant", model, forward_loop, {"alpha": alpha, **options})


def awq(
    model: nn.Module, forward_loop: ForwardLoop = None, algorithm: str = "awq_lite", **options: Any
) -> None:
    """AWQ: ``algorithm`` is ``"awq_lite"`` (scales), ``"awq_clip"`` (clipping) or ``"awq_full"`` (both)."""
    if algorithm not in ("awq_lite", "awq_clip", "awq_full"):
        raise ValueError(f"awq algorithm must be awq_lite, awq_clip or awq_full, got {algorithm!r}")
    _run(algorithm, model, forward_loop, options)


def svdquant(
    model: nn.Module, forward_loop: ForwardLoop = None, lowrank: int = 32, **options: Any
) -> None:
    """SVDQuant: a rank-``lowrank`` high-precision branch beside each quantized weight."""
    _run("svdquant", model, forward_loop, {"lowrank": lowrank, **options})


def gptq(model: nn.Module, forward_loop: ForwardLoop = None, **options: Any) -> None:
    """GPTQ weight rounding (``percdamp``, ``block_size``, ``act_order`` options)."""
    _run("gptq", model, forward_loop, options)


__all__ = ["awq", "gptq", "max_calibrate", "mse_calibrate", "smoothquant", "svdquant"]
